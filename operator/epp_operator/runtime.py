"""One operator process: the embedded picker on its thread, kopf on another.

:class:`OperatorRuntime` is what ``sluice operator`` runs and what the tests start against
an emulated API server. Shutdown drains the picker first (readiness NOT_SERVING, no new
streams, in-flight requests finish within the grace period), then stops the watches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading

import kopf

from epp.config import loader
from epp.datastore.reconciler import Reconciler
from epp.picker import Picker
from epp_operator import handlers
from epp_operator.embedding import PickerThread
from epp_operator.feed import ClusterFeed
from epp_operator.resync import Resync
from epp_operator.settings import OperatorOptions

log = logging.getLogger(__name__)


class _SignalsHandledElsewhere(logging.Filter):
    """kopf warns that it ignores OS signals off the main thread; ours handles them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("OS signals are ignored")


logging.getLogger("kopf._core.reactor.running").addFilter(_SignalsHandledElsewhere())


class OperatorRuntime:
    def __init__(self, options: OperatorOptions) -> None:
        self.options = options
        self.reconciler = Reconciler(
            pool_name=options.pool_name, pool_namespace=options.pool_namespace
        )
        # The pool name also tells the picker to wait for our mark_synced before turning ready.
        picker_options = dataclasses.replace(
            options.picker, pool_name=options.pool_name, pool_namespace=options.pool_namespace
        )
        self._picker_thread = PickerThread(lambda: Picker(picker_options, self.reconciler))
        self._feed: ClusterFeed | None = None
        self._kopf_thread: threading.Thread | None = None
        self._kopf_stop = threading.Event()
        self._kopf_ready = threading.Event()
        self._kopf_done: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def picker(self) -> Picker:
        return self._picker_thread.picker

    @property
    def feed(self) -> ClusterFeed:
        if self._feed is None:
            raise RuntimeError("the operator is not running")
        return self._feed

    @property
    def kopf_done(self) -> concurrent.futures.Future[None]:
        """Resolves when kopf stops (with its exception if it failed)."""
        return self._kopf_done

    def start(self, timeout_s: float = 30.0) -> None:
        self._picker_thread.start(timeout_s)
        self._feed = ClusterFeed(
            self._picker_thread.loop, self.reconciler, coalesce=self.options.coalesce_snapshots
        )
        self.resync = Resync(self.options, self._feed)
        registry = handlers.build_registry(self.options, self._feed, self, self.resync)
        self._kopf_thread = threading.Thread(
            target=self._run_kopf, args=(registry,), name="sluice-kopf", daemon=True
        )
        self._kopf_thread.start()
        ready = self._kopf_ready.wait(timeout_s)
        if self._kopf_done.done():
            self._picker_thread.stop()
            self._kopf_done.result()  # raises kopf's startup error
        if not ready:
            self.stop()
            raise TimeoutError(f"kopf did not start within {timeout_s:g}s")

    def stop(self) -> None:
        """Drain the picker (grace period), then stop kopf; safe to call twice."""
        self._picker_thread.stop(self.options.shutdown_grace_s + 30.0)
        self._kopf_stop.set()
        if self._kopf_thread is not None:
            self._kopf_thread.join(30.0)
            self._kopf_thread = None

    async def reload_config(self, text: str, origin: str) -> str | None:
        """Called on kopf's loop; validates and swaps on the picker's loop."""
        future = self._picker_thread.run(self._reload_on_picker(text, origin))
        return await asyncio.wrap_future(future)

    async def _reload_on_picker(self, text: str, origin: str) -> str | None:
        try:
            self.picker.reload_config(text, origin)
        except loader.ConfigError as error:
            return str(error)
        return None

    def _run_kopf(self, registry: kopf.OperatorRegistry) -> None:
        options = self.options
        liveness = (
            f"http://{options.liveness_host}:{options.liveness_port}/healthz"
            if options.liveness_port
            else None
        )
        try:
            asyncio.run(
                kopf.operator(
                    registry=registry,
                    settings=handlers.kopf_settings(options),
                    standalone=options.standalone,
                    peering_name=None if options.standalone else options.peering_name,
                    clusterwide=options.clusterwide,
                    namespaces=() if options.clusterwide else options.watched_namespaces,
                    liveness_endpoint=liveness,
                    stop_flag=self._kopf_stop,
                    ready_flag=self._kopf_ready,
                )
            )
        except BaseException as error:
            log.error("kopf stopped with an error: %s", error)
            self._kopf_done.set_exception(error)
            self._kopf_ready.set()
        else:
            self._kopf_done.set_result(None)
            self._kopf_ready.set()
