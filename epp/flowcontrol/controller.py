"""The flow controller: admission, priority bands, limits, TTLs and dispatch.

`admit(request)` returns at once (an `Admission`) when nothing of equal or higher priority
is waiting and the pool is below the band's saturation ceiling; otherwise the request joins
its band's queue and waits until the dispatcher lets it go, its TTL runs out, or the client
goes away (the await is cancelled). Limits, full queues and shedding end admission with a
`Rejection` (see `outcomes`; the request path decides what the client hears). Every path
that does not hand an `Admission` to the caller releases the workload's slot before
returning or raising; the caller releases a handed-out one with `release` (exactly once;
a second release is counted, never applied).

One dispatcher task runs while requests wait. Bands go strictly from high to low priority;
a band stops dispatch for itself and every lower band when no endpoint has room below its
ceiling; how many queued requests fit in that room is the `budget` module's business.

Time for ordering and TTLs comes from `clock` (injectable, so tests need no sleeps); the
detector's staleness check uses `time.monotonic`, the clock metrics are stamped with.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Histogram

from epp import metrics
from epp.datalayer.endpoint_metrics import EndpointLoad
from epp.flowcontrol import budget, limits
from epp.flowcontrol.interfaces import BandQueue, QueueItem
from epp.flowcontrol.outcomes import Rejection, RejectReason
from epp.flowcontrol.registry import Ticket, WorkloadRegistry, WorkloadView
from epp.flowcontrol.settings import BandSettings, FlowControlSettings
from epp.flowcontrol.workload import WorkloadContext

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class FlowRequest:
    request_id: str
    workload: WorkloadContext
    fairness_id: str
    priority: int
    size_bytes: int = 0
    # The workload's WorkloadClass limits (None: no limit): queued + in-flight requests,
    # and a token bucket of `requests_per_second` holding up to `burst` tokens.
    max_concurrent: int | None = None
    requests_per_second: float | None = None
    burst: int | None = None
    # The request's time-to-first-token objective (None: none), for SLO-aware ordering.
    ttft_slo_s: float | None = None


class Admission:
    """A dispatched request's hold on flow control; `release()` when the request ends."""

    __slots__ = ("_controller", "ticket")

    def __init__(self, controller: FlowController, ticket: Ticket) -> None:
        self._controller = controller
        self.ticket = ticket

    @property
    def released(self) -> bool:
        return self.ticket.released

    def release(self) -> None:
        self._controller.release(self.ticket)


class _Band:
    __slots__ = ("_bytes_gauge", "_size_gauge", "bytes", "priority", "queue", "settings")

    def __init__(self, priority: int, settings: BandSettings, registry: WorkloadRegistry) -> None:
        self.priority = priority
        self.settings = settings
        self.queue: BandQueue = settings.fairness.new_band(settings.ordering, registry)
        self.bytes = 0
        self._size_gauge = metrics.flow_control_queue_size.labels(str(priority))
        self._bytes_gauge = metrics.flow_control_queue_bytes.labels(str(priority))

    def publish(self) -> None:
        self._size_gauge.set(len(self.queue))
        self._bytes_gauge.set(self.bytes)


class FlowController:
    def __init__(
        self,
        settings: FlowControlSettings,
        *,
        pool: Callable[[], Sequence[EndpointLoad]],
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._pool = pool
        w = settings.workload
        self.registry = WorkloadRegistry(
            window_s=w.sliding_window_s, idle_timeout_s=w.idle_timeout_s
        )
        self._bands: dict[int, _Band] = {}
        self._order: list[_Band] = []  # highest priority first
        self._queued = 0
        self._queued_bytes = 0
        self._seq = 0
        self._deadlines: list[tuple[float, int, QueueItem]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cleanup_task: asyncio.Task[None] | None = None
        self._budget = budget.DispatchBudget()
        self._immediate: dict[int, Histogram] = {}

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher and the registry cleanup (on the running loop)."""
        self._task = asyncio.create_task(self._dispatch_loop(), name="flow-dispatch")
        self._cleanup_task = asyncio.create_task(self._cleanup_loop(), name="workload-cleanup")

    async def stop(self) -> None:
        for task in (self._task, self._cleanup_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._cleanup_task = None
        for band in self._order:
            for item in band.queue.drain():
                stopping = Rejection(RejectReason.STOPPING, "the picker is stopping")
                self._finish(item, band, "rejected", stopping)

    def let_all_go(self) -> int:
        """Dispatch everything queued at once (flow control is being switched off)."""
        now, count = self.clock(), 0
        for band in self._order:
            while (item := band.queue.pop(now)) is not None:
                self._finish(item, band, "dispatched", None)
                count += 1
        return count

    def reconfigure(self, settings: FlowControlSettings) -> None:
        """Take new policies and limits; queued requests move over in arrival order.

        The registry (rates, totals) is kept; a changed sliding window applies to a new
        controller only."""
        items = [i for band in self._order for i in band.queue.drain()]
        self.settings = settings
        self._bands.clear()
        self._order.clear()
        now = self.clock()
        for item in sorted(items, key=lambda i: i.seq):
            self._band(item.priority).queue.push(item, now)
        for band in self._order:
            band.publish()
        self._wake.set()

    # ---- admission ------------------------------------------------------------------------

    def queued(self) -> int:
        return self._queued

    def workload_view(self, workload_id: str) -> WorkloadView | None:
        """One workload's numbers now (for the metrics port's JSON endpoint)."""
        now = self.clock()
        self.registry.advance(now)
        return self.registry.view(workload_id, now)

    def _band(self, priority: int) -> _Band:
        band = self._bands.get(priority)
        if band is None:
            band = _Band(priority, self.settings.band(priority), self.registry)
            self._bands[priority] = band
            self._order.append(band)
            self._order.sort(key=lambda b: -b.priority)
        return band

    def _has_room(self, ceiling: float) -> bool:
        self._saturation()
        return self._budget.allows(ceiling)

    def publish_saturation(self) -> float:
        """Recompute the pool's saturation for its gauge: the pool changes with no request
        arriving (an idle pool drains), and the gauge must say so."""
        return self._saturation()

    def _saturation(self) -> float:
        value = self._budget.measure(self.settings.detector, self._pool())
        metrics.flow_control_pool_saturation.set(value)
        return value

    def _waiting_at_or_above(self, priority: int) -> bool:
        for band in self._order:
            if band.priority < priority:
                return False
            if band.queue:
                return True
        return False

    async def admit(self, request: FlowRequest) -> Admission | Rejection:
        """Wait until the request may go (an `Admission` to release when it ends), or say why
        it may not. A cancelled wait (client gone) propagates, with nothing left held."""
        now = self.clock()
        ticket = self.registry.arrive(request.workload.workload_id, now)
        try:
            rejection = await self._admit(request, ticket, now)
        except BaseException:
            self.registry.release(ticket)
            raise
        if rejection is not None:
            self.registry.release(ticket)
            return rejection
        return Admission(self, ticket)

    async def _admit(self, request: FlowRequest, ticket: Ticket, now: float) -> Rejection | None:
        label = str(request.priority)
        rejected = limits.workload_class(
            self.registry,
            ticket,
            now,
            max_concurrent=request.max_concurrent,
            requests_per_second=request.requests_per_second,
            burst=request.burst,
            retry_after_s=self.settings.retry_after_s,
        )
        if rejected is not None:
            self._reject(label)
            return rejected
        ceiling = self.settings.band(request.priority).saturation_ceiling
        if not self._waiting_at_or_above(request.priority) and self._has_room(ceiling):
            immediate = self._immediate.get(request.priority)
            if immediate is None:  # labels() costs more than the observation itself
                immediate = metrics.flow_control_request_queue_duration_seconds.labels(
                    label, "dispatched"
                )
                self._immediate[request.priority] = immediate
            immediate.observe(0)
            self.registry.record_wait(ticket, 0.0)
            return None
        if request.priority < 0:  # sheddable: never queued
            self._reject(label)
            return Rejection(
                RejectReason.SHED,
                "the pool is saturated; sheddable request dropped",
                self.settings.retry_after_s,
            )
        band = self._band(request.priority)
        rejected = limits.capacity(
            self.settings,
            size_bytes=request.size_bytes,
            queued=self._queued,
            queued_bytes=self._queued_bytes,
            priority=band.priority,
            band=band.settings,
            band_queued=len(band.queue),
            band_bytes=band.bytes,
        )
        if rejected is not None:
            self._reject(label)
            return rejected
        ttl = self.settings.default_request_ttl_s
        self._seq += 1
        item = QueueItem(
            request_id=request.request_id,
            workload_id=ticket.workload_id,
            criticality=request.workload.criticality,
            fairness_id=request.fairness_id,
            priority=request.priority,
            size_bytes=request.size_bytes,
            enqueued_at=now,
            deadline=now + ttl if ttl > 0 else math.inf,
            slo_deadline=now + request.ttft_slo_s if request.ttft_slo_s else math.inf,
            seq=self._seq,
            ticket=ticket,
        )
        future: asyncio.Future[Rejection | None] = asyncio.get_running_loop().create_future()
        item.future = future
        band.queue.push(item, now)
        band.bytes += item.size_bytes
        self._queued += 1
        self._queued_bytes += item.size_bytes
        band.publish()
        if ttl > 0:
            heapq.heappush(self._deadlines, (item.deadline, item.seq, item))
        log.debug(
            "flow enqueued: request %s workload %r criticality %d priority %d (%d queued)",
            item.request_id,
            item.workload_id,
            item.criticality,
            item.priority,
            self._queued,
        )
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The client went away while queued: take the item out; the caller's `except`
            # releases the ticket.
            if (not future.done() or future.cancelled()) and not item.removed:
                # By priority, not `band`: a reload may have moved the item to a new band.
                current = self._bands[item.priority]
                current.queue.remove(item)
                self._unqueue(item, current)
                self._observe(item, "cancelled")
            raise
        finally:
            if item.in_transit:  # dispatched: the caller routes it before yielding again
                item.in_transit = False
                self._budget.in_transit -= 1

    def _reject(self, label: str) -> None:
        metrics.flow_control_request_queue_duration_seconds.labels(label, "rejected").observe(0)

    def release(self, ticket: Ticket) -> None:
        """The request ended (any way) after admission handed out its ticket."""
        # A finished request may have made room, but the next scrape is what shows it; the
        # dispatcher polls while anything waits, so no wake-up is needed here.
        self.registry.release(ticket)

    # ---- dispatch -------------------------------------------------------------------------

    def _unqueue(self, item: QueueItem, band: _Band) -> None:
        item.removed = True
        band.bytes -= item.size_bytes
        self._queued -= 1
        self._queued_bytes -= item.size_bytes
        band.publish()

    def _observe(self, item: QueueItem, outcome: str) -> None:
        metrics.flow_control_request_queue_duration_seconds.labels(
            str(item.priority), outcome
        ).observe(max(0.0, self.clock() - item.enqueued_at))

    def _finish(
        self, item: QueueItem, band: _Band, outcome: str, rejection: Rejection | None
    ) -> None:
        self._unqueue(item, band)
        self._observe(item, outcome)
        future = item.future
        if future is not None and not future.done():
            future.set_result(rejection)

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            item = heapq.heappop(deadlines)[2]
            if item.removed:
                continue
            band = self._bands.get(item.priority)
            if band is None:
                continue
            band.queue.remove(item)
            log.debug("flow TTL expired: request %s", item.request_id)
            self._finish(
                item,
                band,
                "evicted",
                Rejection(
                    RejectReason.TTL_EXPIRED,
                    "request waited longer than its TTL of "
                    f"{self.settings.default_request_ttl_s:g}s in the flow control queue",
                ),
            )

    def dispatch_ready(self) -> int:
        """One dispatch cycle; returns how many requests were let go."""
        now = self.clock()
        self.registry.advance(now)
        self._expire(now)
        if not self._queued:
            return 0
        self._saturation()
        dispatched = 0
        for band in self._order:
            while band.queue:
                if not self._budget.allows(band.settings.saturation_ceiling):
                    return dispatched
                item = band.queue.pop(now)
                if item is None:
                    break
                if item.future is not None and item.future.done():
                    # Its client left (the task's cancel cancelled the future) and the task
                    # has not run its cleanup yet: not a dispatch.
                    self._finish(item, band, "cancelled", None)
                    continue
                item.in_transit = True
                self._budget.in_transit += 1
                dispatched += 1
                if item.ticket is not None:
                    self.registry.record_wait(item.ticket, now - item.enqueued_at)
                log.debug(
                    "flow dispatch: request %s workload %r criticality %d priority %d after %.3fs",
                    item.request_id,
                    item.workload_id,
                    item.criticality,
                    item.priority,
                    now - item.enqueued_at,
                )
                self._finish(item, band, "dispatched", None)
        return dispatched

    async def _dispatch_loop(self) -> None:
        poll = self.settings.dispatch_poll_interval_s
        while True:
            self._wake.clear()
            try:
                self.dispatch_ready()
            except Exception:  # a policy bug must not stop every queued request forever
                log.exception("flow dispatch cycle failed")
            if self._queued:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll)
            else:
                await self._wake.wait()

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.workload.cleanup_interval_s)
            self.registry.cleanup(self.clock())
