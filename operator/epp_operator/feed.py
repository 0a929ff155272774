"""Hands cluster objects from kopf's thread to the reconciler on the picker's loop.

kopf runs on its own thread and loop; the reconciler and everything subscribed to it (the
collector, the scheduler's state) belong to the picker's loop and must only be touched
there. :class:`ClusterFeed` keeps the operator's view of the cluster behind a lock and asks
the picker loop to catch up with it.

Coalescing: the reconciler rebuilds the whole snapshot on every change, so a burst of pod
events (a rollout, a node drain, a re-list after a reconnect) would cost one full rebuild
per event on the request path's loop (about 2 ms each with 1,000 pods). Instead, every
change made before the picker loop gets to it becomes one ``Reconciler.replace`` call, and
rebuilds are at least ``min_interval_s`` apart: the first change after a quiet spell is
applied at once, changes during a burst wait at most that long, and rebuild work stays a
bounded share of the loop however fast events come. ``coalesce=False`` applies each event
on its own; it exists so the burst benchmark can show the difference.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from epp.datastore import kube_objects
from epp.datastore.reconciler import ObjectKey, Reconciler

log = logging.getLogger(__name__)


class ClusterFeed:
    """The latest version of every watched object; the reconciler follows it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reconciler: Reconciler,
        *,
        coalesce: bool = True,
        min_interval_s: float = 0.05,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self._loop = loop
        # How a delayed rebuild is scheduled (the loop's timer; tests pass their own).
        self._call_later = call_later or loop.call_later
        self._reconciler = reconciler
        self._coalesce = coalesce
        self._min_interval_s = min_interval_s
        self._last_flush = -min_interval_s
        self._sync_requested = False
        self._lock = threading.Lock()
        self._objects: dict[ObjectKey, Mapping[str, Any]] = {}
        self._stamps: dict[ObjectKey, int] = {}  # when each object was last upserted
        self._clock = 0
        self._flush_pending = False
        self.flushes = 0  # snapshot rebuilds requested on the picker loop (for benchmarks)

    def upsert(self, obj: Mapping[str, Any]) -> None:
        """An object was added or changed (any thread)."""
        kind = str(obj.get("kind"))
        namespace, name = kube_objects.metadata(obj)
        with self._lock:
            self._clock += 1
            self._objects[(kind, namespace, name)] = obj
            self._stamps[(kind, namespace, name)] = self._clock
            self._schedule_locked(self._reconciler.apply, obj)

    def remove(self, kind: str, namespace: str, name: str) -> None:
        """An object was deleted (any thread)."""
        with self._lock:
            self._stamps.pop((kind, namespace, name), None)
            if self._objects.pop((kind, namespace, name), None) is None:
                return
            self._schedule_locked(self._reconciler.delete, kind, namespace, name)

    def stamp(self) -> int:
        """A point in time for :meth:`retain`: take it before listing."""
        with self._lock:
            return self._clock

    def retain(self, kind: str, present: set[tuple[str, str]], since: int) -> int:
        """Drop objects of `kind` a fresh list no longer has (deleted while no watch was
        open), except those upserted after `since`, which are newer than that list.
        Returns how many were dropped."""
        with self._lock:
            gone = [
                key
                for key in self._objects
                if key[0] == kind
                and (key[1], key[2]) not in present
                and self._stamps.get(key, 0) <= since
            ]
            for key in gone:
                del self._objects[key]
                self._stamps.pop(key, None)
                self._schedule_locked(self._reconciler.delete, *key)
        return len(gone)

    def mark_synced(self) -> None:
        """Every watch delivered its initial list; readiness may turn SERVING.

        Applied with (after) the next flush, so the first SERVING snapshot already holds
        everything the initial lists delivered.
        """
        if not self._coalesce:
            self._loop.call_soon_threadsafe(self._reconciler.mark_synced)
            return
        with self._lock:
            self._sync_requested = True
            self._schedule_locked(None)

    def objects(self, kind: str) -> list[Mapping[str, Any]]:
        with self._lock:
            return [obj for (k, _, _), obj in self._objects.items() if k == kind]

    def _schedule_locked(self, apply_one: Any, *args: Any) -> None:
        if not self._coalesce:
            self.flushes += 1
            self._loop.call_soon_threadsafe(self._guarded, apply_one, *args)
            return
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon_threadsafe(self._flush_when_due)

    def _flush_when_due(self) -> None:
        wait_s = self._last_flush + self._min_interval_s - self._loop.time()
        if wait_s > 0:
            self._call_later(wait_s, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            self._flush_pending = False
            objects = list(self._objects.values())
            synced, self._sync_requested = self._sync_requested, False
            self.flushes += 1
        self._last_flush = self._loop.time()
        self._guarded(self._reconciler.replace, objects)
        if synced:
            self._reconciler.mark_synced()

    @staticmethod
    def _guarded(apply: Any, *args: Any) -> None:
        # A malformed object must not take the picker loop's callback down with it; the
        # reconciler already skips objects it cannot use, this catches the rest.
        try:
            apply(*args)
        except (kube_objects.ObjectError, ValueError) as error:
            log.error("cluster object rejected: %s", error)
