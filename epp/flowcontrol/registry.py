"""Per-workload accounting: totals, active requests, sliding-window request rates.

The workload-aware ordering policy reads a workload's request rate at dispatch time, so the
rate must be cheap to read and must change only at moments the policy hears about. Rates
therefore come from a ring of `buckets` counters per workload covering `window_s`: the rate
is (requests in the last `buckets` buckets) / `window_s`. It changes on an arrival and when
a non-empty bucket leaves the window; both are reported to the workload's listeners
(`RateListener`), so a queue can re-key exactly the workloads whose rate moved.

Time is always passed in (`now`, seconds on one monotonic clock), never read here: the
flow controller owns the clock, and tests drive it without sleeping.

Memory is bounded: a workload with nothing active is forgotten `idle_timeout_s` after its
last request, and at most `max_workloads` are tracked, plus `default`: beyond that new
ids are accounted under `default`, after an early cleanup failed to make room. Only the
first `metrics.MAX_WORKLOAD_SERIES` live workloads get Prometheus series of their own (ids
come from clients); the rest are tracked and visible in the JSON API, not in /metrics.
"""

from __future__ import annotations

import contextlib
import logging
import math
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from epp import cardinality, metrics
from epp.flowcontrol.workload import DEFAULT_WORKLOAD, WorkloadId

log = logging.getLogger(__name__)


class RateListener(Protocol):
    def rate_changed(self, stats: WorkloadStats) -> None: ...


class _Settable(Protocol):
    def set(self, value: float) -> None: ...


class _Unexposed:
    """Stands in for the gauges of a workload beyond the metric series limit."""

    def set(self, value: float) -> None:
        pass


_UNEXPOSED = _Unexposed()


class WorkloadStats:
    """One workload's live counters (mutated only by the registry)."""

    __slots__ = (
        "_active_gauge",
        "_newest_bucket",
        "_rate_gauge",
        "_ring",
        "_total_counter",
        "active",
        "dispatched",
        "last_request_at",
        "listeners",
        "refilled_at",
        "tokens",
        "total",
        "wait_total_s",
        "window_count",
        "workload_id",
    )

    def __init__(
        self, workload_id: WorkloadId, buckets: int, bucket_index: int, exposed: bool
    ) -> None:
        self.workload_id = workload_id
        self.total = 0
        self.active = 0
        self.last_request_at = 0.0
        self.window_count = 0
        self.wait_total_s = 0.0
        self.dispatched = 0
        self.listeners: list[RateListener] = []
        self.tokens = -1.0  # WorkloadClass requestsPerSecond bucket; < 0: not started
        self.refilled_at = 0.0
        self._ring = array("I", bytes(4 * buckets))
        self._newest_bucket = bucket_index
        gauges: tuple[_Settable, _Settable, _Settable]
        if exposed:
            gauges = (
                metrics.workload_active_requests.labels(workload_id),
                metrics.workload_total_requests.labels(workload_id),
                metrics.workload_request_rate.labels(workload_id),
            )
        else:
            # Past the series limit the workload is tracked but has no series of its own.
            metrics.WORKLOAD_OVERFLOW.inc()
            gauges = (_UNEXPOSED, _UNEXPOSED, _UNEXPOSED)
        self._active_gauge: _Settable = gauges[0]
        self._total_counter: _Settable = gauges[1]
        self._rate_gauge: _Settable = gauges[2]

    def _advance(self, bucket_index: int) -> None:
        """Drop the buckets that left the window ending at `bucket_index`."""
        gap = bucket_index - self._newest_bucket
        if gap <= 0:
            return
        ring = self._ring
        size = len(ring)
        if gap >= size:
            for i in range(size):
                ring[i] = 0
            self.window_count = 0
        else:
            for index in range(self._newest_bucket + 1, bucket_index + 1):
                slot = index % size
                self.window_count -= ring[slot]
                ring[slot] = 0
        self._newest_bucket = bucket_index


@dataclass(frozen=True, slots=True)
class WorkloadView:
    """A copy of one workload's numbers, for the JSON debug endpoint and tests."""

    workload_id: str
    total_requests: int
    active_requests: int
    request_rate: float
    average_wait_s: float
    seconds_since_last_request: float


class Ticket:
    """One request's hold on its workload's `active` count; released exactly once."""

    __slots__ = ("released", "stats")

    def __init__(self, stats: WorkloadStats) -> None:
        self.stats = stats
        self.released = False

    @property
    def workload_id(self) -> WorkloadId:
        return self.stats.workload_id


class WorkloadRegistry:
    def __init__(
        self,
        *,
        window_s: float = 60.0,
        buckets: int = 60,
        idle_timeout_s: float = 300.0,
        max_workloads: int = 10_000,
    ) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s must be positive and buckets at least 1")
        self.window_s = window_s
        self.buckets = buckets
        self.idle_timeout_s = idle_timeout_s
        self.max_workloads = max_workloads
        self._bucket_s = window_s / buckets
        self._workloads: dict[WorkloadId, WorkloadStats] = {}
        # Which workloads have series of their own (ids come from clients: bounded).
        self._series = cardinality.LabelSets(metrics.MAX_WORKLOAD_SERIES, (cardinality.OVERFLOW,))
        # (bucket index at which a bucket expires, workloads with arrivals in that bucket),
        # in increasing order because time only moves forward.
        self._expiries: deque[tuple[int, list[WorkloadStats]]] = deque()
        self._now_bucket = -(2**62)
        self.released_twice = 0  # must stay 0; tests assert it

    # ---- reading ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._workloads)

    def __contains__(self, workload_id: object) -> bool:
        return workload_id in self._workloads

    def get(self, workload_id: str) -> WorkloadStats | None:
        return self._workloads.get(WorkloadId(workload_id))

    def rate(self, stats: WorkloadStats) -> float:
        """Requests per second over the window, as of the last `advance`/`arrive`."""
        return stats.window_count / self.window_s

    def rate_of(self, workload_id: str) -> float:
        stats = self._workloads.get(WorkloadId(workload_id))
        return 0.0 if stats is None else stats.window_count / self.window_s

    def view(self, workload_id: str, now: float) -> WorkloadView | None:
        stats = self._workloads.get(WorkloadId(workload_id))
        if stats is None:
            return None
        return WorkloadView(
            workload_id=stats.workload_id,
            total_requests=stats.total,
            active_requests=stats.active,
            request_rate=self.rate(stats),
            average_wait_s=stats.wait_total_s / stats.dispatched if stats.dispatched else 0.0,
            seconds_since_last_request=max(0.0, now - stats.last_request_at),
        )

    def total_active(self) -> int:
        return sum(s.active for s in self._workloads.values())

    # ---- changing -----------------------------------------------------------------------

    def _bucket(self, now: float) -> int:
        return math.floor(now / self._bucket_s)

    def arrive(self, workload_id: WorkloadId, now: float) -> Ticket:
        """A request of this workload arrived: count it and make it active."""
        self.advance(now)
        stats = self._workloads.get(workload_id)
        if stats is None:
            stats = self._add(workload_id, now)
        stats._advance(self._now_bucket)
        stats.total += 1
        stats.active += 1
        stats.last_request_at = now
        slot = self._now_bucket % self.buckets
        if stats._ring[slot] == 0:
            expire_at = self._now_bucket + self.buckets
            if self._expiries and self._expiries[-1][0] == expire_at:
                self._expiries[-1][1].append(stats)
            else:
                self._expiries.append((expire_at, [stats]))
        stats._ring[slot] += 1
        stats.window_count += 1
        stats._total_counter.set(stats.total)
        stats._active_gauge.set(stats.active)
        stats._rate_gauge.set(stats.window_count / self.window_s)
        for listener in stats.listeners:
            listener.rate_changed(stats)
        return Ticket(stats)

    def _add(self, workload_id: WorkloadId, now: float) -> WorkloadStats:
        if len(self._workloads) >= self.max_workloads:
            self.cleanup(now, force=True)
        if len(self._workloads) >= self.max_workloads and workload_id != DEFAULT_WORKLOAD:
            log.info(
                "workload registry full (%d workloads); accounting %r as %r",
                self.max_workloads,
                workload_id,
                DEFAULT_WORKLOAD,
            )
            existing = self._workloads.get(DEFAULT_WORKLOAD)
            if existing is not None:
                return existing
            workload_id = DEFAULT_WORKLOAD
        exposed = self._series.admit((workload_id,), 0.0) == (workload_id,)
        stats = WorkloadStats(workload_id, self.buckets, self._now_bucket, exposed)
        self._workloads[workload_id] = stats
        return stats

    def release(self, ticket: Ticket) -> bool:
        """Give back the request's active slot; False (and counted) if already given back."""
        if ticket.released:
            self.released_twice += 1
            return False
        ticket.released = True
        stats = ticket.stats
        stats.active -= 1
        if stats.active < 0:  # cannot happen with tickets; guarded so a gauge never lies
            log.error("workload %r active count went negative", stats.workload_id)
            stats.active = 0
        stats._active_gauge.set(stats.active)
        return True

    def take_token(self, stats: WorkloadStats, now: float, per_second: float, burst: int) -> float:
        """Token bucket for a WorkloadClass `requestsPerSecond`/`burst` limit: 0.0 when the
        request may go (a token is taken), else the seconds until a token is due."""
        capacity = float(max(1, burst))
        if stats.tokens < 0:
            stats.tokens, stats.refilled_at = capacity, now
        elif now > stats.refilled_at:
            stats.tokens = min(capacity, stats.tokens + (now - stats.refilled_at) * per_second)
            stats.refilled_at = now
        if stats.tokens >= 1.0:
            stats.tokens -= 1.0
            return 0.0
        return (1.0 - stats.tokens) / per_second

    def record_wait(self, ticket: Ticket, wait_s: float) -> None:
        stats = ticket.stats
        stats.wait_total_s += wait_s
        stats.dispatched += 1

    def advance(self, now: float) -> None:
        """Move the window to `now`: drop expired buckets and tell listeners of rate drops."""
        bucket = self._bucket(now)
        if bucket <= self._now_bucket:
            return
        self._now_bucket = bucket
        expiries = self._expiries
        while expiries and expiries[0][0] <= bucket:
            _, expired = expiries.popleft()
            for stats in expired:
                if self._workloads.get(stats.workload_id) is not stats:
                    continue  # forgotten since
                before = stats.window_count
                stats._advance(bucket)
                if stats.window_count != before:
                    stats._rate_gauge.set(stats.window_count / self.window_s)
                    for listener in stats.listeners:
                        listener.rate_changed(stats)

    def cleanup(self, now: float, *, force: bool = False) -> int:
        """Forget workloads idle for `idle_timeout_s` (any idle one when `force`)."""
        self.advance(now)
        limit = now - self.idle_timeout_s
        gone = [
            stats
            for stats in self._workloads.values()
            if stats.active == 0
            and not stats.listeners
            and (force or stats.last_request_at <= limit)
        ]
        for stats in gone:
            del self._workloads[stats.workload_id]
            if stats._active_gauge is _UNEXPOSED:
                continue
            self._series.release((stats.workload_id,))
            for family in (
                metrics.workload_active_requests,
                metrics.workload_total_requests,
                metrics.workload_request_rate,
            ):
                with contextlib.suppress(KeyError):
                    family.remove(stats.workload_id)
        return len(gone)
