"""Admission limits, checked before a request may wait: its WorkloadClass's limits
(concurrency, request rate) and the queues' capacity (requests, bytes; global and per
band). Each check returns the `Rejection`, or None when the request may go on."""

from __future__ import annotations

import math

from epp.flowcontrol.outcomes import Rejection, RejectReason
from epp.flowcontrol.registry import Ticket, WorkloadRegistry
from epp.flowcontrol.settings import BandSettings, FlowControlSettings


def workload_class(
    registry: WorkloadRegistry,
    ticket: Ticket,
    now: float,
    *,
    max_concurrent: int | None,
    requests_per_second: float | None,
    burst: int | None,
    retry_after_s: int,
) -> Rejection | None:
    """`ticket` already counts this request as active and as an arrival."""
    if max_concurrent is not None and ticket.stats.active > max_concurrent:
        return Rejection(
            RejectReason.WORKLOAD_CONCURRENCY,
            f"workload {ticket.workload_id!r} has {max_concurrent} requests active, its "
            "WorkloadClass limit",
            retry_after_s,
        )
    if requests_per_second is not None and requests_per_second > 0:
        wait_s = registry.take_token(
            ticket.stats, now, requests_per_second, burst or math.ceil(requests_per_second)
        )
        if wait_s > 0:
            return Rejection(
                RejectReason.WORKLOAD_RATE,
                f"workload {ticket.workload_id!r} is over its WorkloadClass rate of "
                f"{requests_per_second:g} requests per second",
                max(1, math.ceil(wait_s)),
            )
    return None


def capacity(
    settings: FlowControlSettings,
    *,
    size_bytes: int,
    queued: int,
    queued_bytes: int,
    priority: int,
    band: BandSettings,
    band_queued: int,
    band_bytes: int,
) -> Rejection | None:
    """Whether one more request of `size_bytes` fits in the queues."""
    problem = ""
    if settings.max_requests and queued + 1 > settings.max_requests:
        problem = f"flow control queue is full ({settings.max_requests} requests)"
    elif settings.max_bytes and queued_bytes + size_bytes > settings.max_bytes:
        problem = f"flow control queue is full ({settings.max_bytes} bytes)"
    elif band.max_requests and band_queued + 1 > band.max_requests:
        problem = f"priority band {priority} is full ({band.max_requests} requests)"
    elif band.max_bytes and band_bytes + size_bytes > band.max_bytes:
        problem = f"priority band {priority} is full ({band.max_bytes} bytes)"
    if not problem:
        return None
    return Rejection(RejectReason.QUEUE_FULL, problem, settings.retry_after_s)
