"""The reconciler: Kubernetes-shaped objects in, one immutable snapshot out.

Every source (manifest files, static endpoints, the operator's watches) feeds the same
:class:`Reconciler`. It keeps the latest version of each object, rebuilds the snapshot
when something changes, and publishes it to subscribers. Readers hold a reference to the
snapshot they started with, so a swap never disturbs a request in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from epp.datastore import kube_objects
from epp.datastore.snapshot import (
    Endpoint,
    ModelRewrite,
    Objective,
    PoolSpec,
    RewriteTarget,
    Snapshot,
    WorkloadClass,
)

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str, str]  # kind, namespace, name
SnapshotListener = Callable[[Snapshot], None]


class Reconciler:
    """Holds the objects the sources reported and publishes snapshots built from them."""

    def __init__(
        self,
        *,
        pool_name: str | None = None,
        pool_namespace: str = "default",
        static_endpoints: Sequence[Endpoint] = (),
    ) -> None:
        self.pool_name = pool_name
        self.pool_namespace = pool_namespace
        self._static = tuple(static_endpoints)
        self._objects: dict[ObjectKey, Mapping[str, Any]] = {}
        self._listeners: list[SnapshotListener] = []
        self._synced = False
        self._version = 0
        self._current = self._build()

    @property
    def current(self) -> Snapshot:
        return self._current

    @property
    def static_endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints given at construction (`--endpoints`), in every snapshot."""
        return self._static

    def subscribe(self, listener: SnapshotListener) -> None:
        self._listeners.append(listener)

    def apply(self, obj: Mapping[str, Any]) -> None:
        """Add or replace one object (a watch's ADDED/MODIFIED event)."""
        key = self._key(obj)
        self._objects[key] = obj
        self._publish()

    def delete(self, kind: str, namespace: str, name: str) -> None:
        if self._objects.pop((kind, namespace, name), None) is not None:
            self._publish()

    def replace(self, objects: Iterable[Mapping[str, Any]]) -> None:
        """Replace every object at once (a manifest reload or a watch's re-list)."""
        fresh: dict[ObjectKey, Mapping[str, Any]] = {}
        for obj in objects:
            fresh[self._key(obj)] = obj
        self._objects = fresh
        self._publish()

    def mark_synced(self) -> None:
        """All sources delivered their initial state; readiness may turn SERVING."""
        if not self._synced:
            self._synced = True
            self._publish()

    def _key(self, obj: Mapping[str, Any]) -> ObjectKey:
        kind = obj.get("kind")
        if kind not in kube_objects.KINDS:
            raise kube_objects.ObjectError(
                f"{kube_objects.object_id(obj)}: unsupported kind {kind!r} "
                f"(expected one of {', '.join(kube_objects.KINDS)})"
            )
        namespace, name = kube_objects.metadata(obj)
        return str(kind), namespace, name

    def _publish(self) -> None:
        self._current = self._build()
        for listener in self._listeners:
            listener(self._current)

    def _of_kind(self, kind: str) -> list[Mapping[str, Any]]:
        return [obj for (k, _, _), obj in sorted(self._objects.items()) if k == kind]

    def _select_pool(self) -> PoolSpec | None:
        pools: list[PoolSpec] = []
        for obj in self._of_kind("InferencePool"):
            try:
                pools.append(kube_objects.pool_from_object(obj))
            except kube_objects.ObjectError as error:
                log.error("ignoring invalid InferencePool: %s", error)
        if self.pool_name is not None:
            for pool in pools:
                if pool.name == self.pool_name and pool.namespace == self.pool_namespace:
                    return pool
            return None
        return pools[0] if len(pools) == 1 else None

    def _build(self) -> Snapshot:
        self._version += 1
        pool = self._select_pool()
        endpoints = list(self._static)
        if pool is not None:
            for pod in self._of_kind("Pod"):
                meta = pod.get("metadata") or {}
                if (meta.get("namespace") or "default") != pool.namespace:
                    continue
                if not kube_objects.selector_matches(pool.selector, kube_objects.pod_labels(pod)):
                    continue
                if not kube_objects.pod_is_routable(pod):
                    continue
                try:
                    endpoints.extend(kube_objects.endpoints_from_pod(pod, pool))
                except kube_objects.ObjectError as error:
                    log.error("ignoring pod: %s", error)
        objectives: dict[str, Objective] = {}
        rewrites: list[ModelRewrite] = []
        classes: dict[str, WorkloadClass] = {}
        for obj in self._of_kind("InferenceObjective"):
            self._collect(obj, kube_objects.objective_from_object, pool, objectives, "name")
        for obj in self._of_kind("WorkloadClass"):
            self._collect(
                obj, kube_objects.workload_class_from_object, pool, classes, "workload_id"
            )
        for obj in self._of_kind("InferenceModelRewrite"):
            try:
                rewrite = kube_objects.rewrite_from_object(obj, pool)
            except kube_objects.ObjectError as error:
                log.error("ignoring InferenceModelRewrite: %s", error)
                continue
            if rewrite is not None:
                rewrites.append(rewrite)
        exact, catch_all = _index_rewrites(rewrites)
        return Snapshot(
            version=self._version,
            pool=pool,
            endpoints=tuple(endpoints),
            objectives=MappingProxyType(objectives),
            rewrites_exact=MappingProxyType(exact),
            rewrite_catch_all=catch_all,
            workload_classes=MappingProxyType(classes),
            synced=self._synced,
        )

    @staticmethod
    def _collect(
        obj: Mapping[str, Any],
        convert: Callable[[Mapping[str, Any], PoolSpec | None], Any],
        pool: PoolSpec | None,
        into: dict[str, Any],
        key_attribute: str,
    ) -> None:
        try:
            value = convert(obj, pool)
        except kube_objects.ObjectError as error:
            log.error("ignoring object: %s", error)
            return
        if value is not None:
            into.setdefault(getattr(value, key_attribute), value)


def _index_rewrites(
    rewrites: list[ModelRewrite],
) -> tuple[dict[str, tuple[RewriteTarget, ...]], tuple[RewriteTarget, ...]]:
    """Exact matches beat the catch-all; ties go to the oldest object, then rule order."""
    exact: dict[str, tuple[RewriteTarget, ...]] = {}
    catch_all: tuple[RewriteTarget, ...] = ()
    for rewrite in sorted(rewrites, key=lambda r: (r.created, r.namespace, r.name)):
        for rule in rewrite.rules:
            if not rule.exact_models:
                catch_all = catch_all or rule.targets
            for model in rule.exact_models:
                exact.setdefault(model, rule.targets)
    return exact, catch_all
