"""The collector: one scrape loop per endpoint keeps the metrics store fresh.

Each endpoint gets its own asyncio task, so a slow or dead model server delays nobody
else. A tick calls every data source once for the endpoint (under the per-fetch timeout)
and pushes the payload through that source's extractors, which share the one fetch. When
every source succeeded the result is stored with `updated_at = time.monotonic()`. When a
source fails, values from the sources that did succeed are still stored but `updated_at`
keeps its old value, so the endpoint ages into staleness; readers decide staleness with
`EndpointMetrics.is_stale(now, threshold_s)`.

Ticks follow a fixed schedule (`interval_s` apart, measured from tick start, no catch-up
burst after an overrun), each loop starting at a random phase so that many endpoints do
not scrape in lockstep. After a failure the next attempt backs off exponentially
(interval, 2x, 4x, ... up to `max_backoff_s`), so a dead server is not hammered and a
failing loop never spins; the first success returns to the normal interval.

The runner feeds snapshot changes to :meth:`Collector.update_endpoints`, which must be
called on the collector's event loop (from another thread, via
`loop.call_soon_threadsafe`). A config reload that changes the data layer hands the new
sources to :meth:`Collector.replace_sources`: the loops keep running and pick the new
sources up on their next tick, and the metrics store is kept, so no endpoint goes stale
or loses its numbers because of a reload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from epp import metrics
from epp.datalayer import extractors, interfaces
from epp.datalayer import sources as datasources
from epp.datalayer.endpoint_metrics import MetricsStore
from epp.datastore.snapshot import Endpoint, EndpointKey

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.05
DEFAULT_TIMEOUT_S = 1.0
DEFAULT_MAX_BACKOFF_S = 1.0

# Resolved once: a labelled child lookup per tick would cost more than the increment.
_SCRAPE_OK = metrics.scrape_total.labels("success")
_SCRAPE_FAILED = metrics.scrape_total.labels("failure")


@dataclass(slots=True)
class ScrapeStatus:
    """Counters of one endpoint's loop, for logs, health and tests. Owned by the loop."""

    endpoint: Endpoint
    ticks: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_success_at: float = 0.0  # time.monotonic(); 0.0 = never


def default_sources() -> list[interfaces.DataSource]:
    """The pipeline used when the config has no data layer section: `metrics-data-source`
    on `/metrics` pushing to `core-metrics-extractor`."""
    source = datasources.MetricsDataSource()
    source.add_extractor(extractors.CoreMetricsExtractor())
    return [source]


class Collector:
    """Runs the scrape loops of the current endpoints against `sources`.

    `sources=None` means :func:`default_sources`.
    """

    def __init__(
        self,
        store: MetricsStore,
        sources: Sequence[interfaces.DataSource] | None = None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0 or max_backoff_s <= 0:
            raise ValueError(
                f"collector: interval_s ({interval_s}), timeout_s ({timeout_s}) and "
                f"max_backoff_s ({max_backoff_s}) must be positive"
            )
        if sources is None:
            sources = default_sources()
        _check_sources(sources)
        self._store = store
        self._sources = tuple(sources)
        self._timers = _plugin_timers(self._sources)
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._max_backoff_s = max(max_backoff_s, interval_s)
        self._endpoints: dict[EndpointKey, Endpoint] = {}
        self._loops: dict[EndpointKey, asyncio.Task[None]] = {}
        self._status: dict[EndpointKey, ScrapeStatus] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    @property
    def endpoint_keys(self) -> frozenset[EndpointKey]:
        """Endpoints that have a scrape loop (or will get one on start())."""
        return frozenset(self._endpoints)

    def status(self, key: EndpointKey) -> ScrapeStatus | None:
        return self._status.get(key)

    @property
    def sources(self) -> tuple[interfaces.DataSource, ...]:
        return self._sources

    def replace_sources(self, sources: Sequence[interfaces.DataSource]) -> None:
        """Scrape with `sources` from each loop's next tick on; close the old ones that are
        not reused. Stored metrics are kept."""
        _check_sources(sources)
        old = self._sources
        self._timers = _plugin_timers(sources)
        self._sources = tuple(sources)
        kept = {id(s) for s in self._sources}
        for source in old:
            if id(source) not in kept:
                source.close()  # a fetch in flight finishes; its connection closes after

    async def start(self) -> None:
        """Start a loop for every known endpoint."""
        if self._running:
            return
        self._running = True
        for endpoint in self._endpoints.values():
            self._start_loop(endpoint)

    async def stop(self) -> None:
        """Cancel every loop, wait for them to end, and close the sources' connections."""
        self._running = False
        tasks = [*self._loops.values(), *self._stopping]
        self._loops.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._stopping.clear()
        for source in self._sources:
            source.close()

    def update_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the loops match `endpoints` (the new snapshot's endpoints).

        New endpoints get a loop, removed ones lose theirs and their stored metrics. An
        endpoint whose address or port changed under the same key (a recreated pod) starts
        from scratch; one whose other fields changed (labels, engine) keeps its metrics and
        gets a new loop that reads it as it now is.
        """
        wanted = {endpoint.key: endpoint for endpoint in endpoints}
        moved: set[EndpointKey] = set()
        for key, old in list(self._endpoints.items()):
            new = wanted.get(key)
            if new == old:
                continue
            self._stop_loop(key)
            if new is None or (new.address, new.port) != (old.address, old.port):
                moved.add(key)
                for source in self._sources:
                    source.forget(old)
        for key, endpoint in wanted.items():
            if key not in self._loops:  # new, changed, or not started yet
                self._endpoints[key] = endpoint
                if self._running:
                    self._start_loop(endpoint)
        for key in [k for k in self._endpoints if k not in wanted]:
            del self._endpoints[key]
            self._status.pop(key, None)
        self._store.retain(k for k in wanted if k not in moved)

    def _start_loop(self, endpoint: Endpoint) -> None:
        status = ScrapeStatus(endpoint)
        self._status[endpoint.key] = status
        task = asyncio.get_running_loop().create_task(
            self._scrape_loop(endpoint, status), name=f"scrape {endpoint.key}"
        )
        task.add_done_callback(_report_crash)
        self._loops[endpoint.key] = task

    def _stop_loop(self, key: EndpointKey) -> None:
        task = self._loops.pop(key, None)
        if task is None:
            return
        task.cancel()
        # Keep a reference until it has ended, so stop() can wait for it.
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _scrape_loop(self, endpoint: Endpoint, status: ScrapeStatus) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self._interval_s
        await asyncio.sleep(random.random() * interval_s)
        next_at = loop.time()
        while True:
            started = next_at
            await self._tick(endpoint, status)
            if status.consecutive_failures:
                exponent = min(status.consecutive_failures - 1, 30)
                next_at = started + min(interval_s * 2.0**exponent, self._max_backoff_s)
            else:
                next_at = started + interval_s
            now = loop.time()
            if next_at < now:
                next_at = now  # overran: start the next tick now, never a burst
            await asyncio.sleep(next_at - now)

    async def _tick(self, endpoint: Endpoint, status: ScrapeStatus) -> None:
        store = self._store
        key = endpoint.key
        current = store.get(key)
        metrics = current
        error: BaseException | None = None
        failed_source: interfaces.DataSource | None = None
        timers = self._timers
        for source in self._sources:
            before = metrics
            try:
                t = perf_counter()
                async with asyncio.timeout(self._timeout_s):
                    payload = await source.fetch(endpoint)
                now = perf_counter()
                timers[id(source)].observe(now - t)  # wall time: mostly the server's answer
                for extractor in source.extractors:
                    t = now
                    metrics = extractor.extract(payload, endpoint, metrics)
                    now = perf_counter()
                    timers[id(extractor)].observe(now - t)
            except Exception as exc:  # no plugin error may end the loop
                metrics = before  # nothing half-extracted from this source
                error, failed_source = exc, source
        status.ticks += 1
        if error is None:
            _SCRAPE_OK.inc()
            now = time.monotonic()
            store.put(key, dataclasses.replace(metrics, updated_at=now, unreachable=False))
            if status.consecutive_failures:
                logger.info(
                    "metrics of %s (%s) are back after %d failed scrapes",
                    key,
                    endpoint.target,
                    status.consecutive_failures,
                )
            status.consecutive_failures = 0
            status.last_success_at = now
            return
        if getattr(error, "unreachable", False) and not metrics.unreachable:
            # Refused or reset: it is not there, so stop routing to it now rather than
            # when its metrics go stale.
            metrics = dataclasses.replace(metrics, unreachable=True)
        if metrics is not current:
            store.put(key, metrics)  # other sources' values; updated_at stays old
        assert failed_source is not None
        self._record_failure(endpoint, status, failed_source, error)

    def _record_failure(
        self,
        endpoint: Endpoint,
        status: ScrapeStatus,
        source: interfaces.DataSource,
        error: BaseException,
    ) -> None:
        if isinstance(error, TimeoutError):
            reason = f"no answer within {self._timeout_s:g}s"
        elif isinstance(error, interfaces.FetchError | interfaces.ExtractError):
            reason = str(error)
        else:
            reason = f"{type(error).__name__}: {error}"
        _SCRAPE_FAILED.inc()
        status.failures += 1
        status.consecutive_failures += 1
        status.last_error = f"{source.name}: {reason}"
        if status.consecutive_failures == 1:
            # One line per outage, not per tick; a plugin bug also gets its traceback.
            unexpected = not isinstance(
                error, TimeoutError | interfaces.FetchError | interfaces.ExtractError
            )
            consequence = (
                "not routing to it until it answers"
                if getattr(error, "unreachable", False)
                else "keeping its last metrics, which go stale until it answers"
            )
            logger.warning(
                "cannot scrape %s (%s) with data source '%s': %s; %s",
                endpoint.key,
                endpoint.target,
                source.name,
                reason,
                consequence,
                exc_info=error if unexpected else None,
            )
        else:
            logger.debug("scrape of %s still failing: %s", endpoint.key, status.last_error)


def _plugin_timers(sources: Sequence[interfaces.DataSource]) -> dict[int, Any]:
    """`inference_extension_plugin_duration_seconds` children by plugin identity, resolved
    once: a labels() lookup per tick would cost more than the observation."""
    timers: dict[int, Any] = {}
    for source in sources:
        timers[id(source)] = metrics.plugin_duration_seconds.labels(
            "DataSource", source.type_name, source.name
        )
        for extractor in source.extractors:
            timers[id(extractor)] = metrics.plugin_duration_seconds.labels(
                "Extractor", extractor.type_name, extractor.name
            )
    return timers


def _check_sources(sources: Sequence[interfaces.DataSource]) -> None:
    for source in sources:
        if not source.extractors:
            raise ValueError(
                f"data source '{source.name}' (type {source.type_name}) has no "
                f"extractors; wire at least one or remove the source"
            )
        for extractor in source.extractors:
            interfaces.check_wiring(source, extractor)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "scrape loop %r ended unexpectedly", task.get_name(), exc_info=task.exception()
        )


@dataclass(frozen=True, slots=True)
class PoolSummary:
    """Pool-wide figures for the `inference_pool_*` gauges."""

    ready_pods: int  # distinct pods behind the endpoints
    endpoints: int
    fresh_endpoints: int
    average_kv_cache_usage: float  # over fresh endpoints; 0.0 when none is fresh
    average_queue_size: float  # over fresh endpoints; 0.0 when none is fresh


def pool_summary(
    store: MetricsStore,
    endpoints: Sequence[Endpoint],
    now: float | None = None,
    staleness_s: float = 2.0,
) -> PoolSummary:
    """Summarise the pool as of `now` (time.monotonic(); None = now)."""
    if now is None:
        now = time.monotonic()
    pods: set[tuple[str, str]] = set()
    fresh = 0
    kv_total = 0.0
    queue_total = 0
    for endpoint in endpoints:
        pods.add((endpoint.namespace, endpoint.pod_name))
        metrics = store.get(endpoint.key)
        if metrics.is_stale(now, staleness_s):
            continue
        fresh += 1
        kv_total += metrics.kv_cache_usage
        queue_total += metrics.waiting_queue_size
    return PoolSummary(
        ready_pods=len(pods),
        endpoints=len(endpoints),
        fresh_endpoints=fresh,
        average_kv_cache_usage=kv_total / fresh if fresh else 0.0,
        average_queue_size=queue_total / fresh if fresh else 0.0,
    )
