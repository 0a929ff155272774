"""How admission can end other than with a dispatch, in flow control's own words.

Flow control decides; it does not speak HTTP. The request path turns a `Rejection` into the
client's answer (limits and shedding are 429 with retry-after, an
expired TTL or a stopping picker is 503).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RejectReason(enum.Enum):
    WORKLOAD_CONCURRENCY = "workload_concurrency"  # WorkloadClass maxConcurrentRequests
    WORKLOAD_RATE = "workload_rate"  # WorkloadClass requestsPerSecond
    QUEUE_FULL = "queue_full"  # maxRequests / maxBytes, global or per band
    SHED = "shed"  # sheddable (priority < 0) while saturated: never queued
    TTL_EXPIRED = "ttl_expired"  # waited longer than defaultRequestTTL
    STOPPING = "stopping"  # the picker is shutting down

    @property
    def retryable_later(self) -> bool:
        """The client may retry after `retry_after_s` (capacity will come back)."""
        return self not in (RejectReason.TTL_EXPIRED, RejectReason.STOPPING)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    message: str
    retry_after_s: int | None = None
