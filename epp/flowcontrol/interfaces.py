"""Queue items and the flow-control extension points: ordering, fairness, saturation.

A priority band holds the queued requests of one priority. Its fairness policy decides how
the band's flows (one per fairness id) share dispatch; each queue it keeps is built by the
band's ordering policy, which decides which item of a queue leaves first. Items are
removed lazily (`removed` is set and queues skip them), so taking a request out of the
middle of a queue (client gone, TTL) costs O(1).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from epp.datalayer.endpoint_metrics import EndpointLoad, EndpointMetrics
from epp.flowcontrol.workload import WorkloadId

if TYPE_CHECKING:
    from epp.flowcontrol.outcomes import Rejection
    from epp.flowcontrol.registry import Ticket, WorkloadRegistry


class QueueItem:
    """One waiting request as the queues see it."""

    __slots__ = (
        "criticality",
        "deadline",
        "enqueued_at",
        "fairness_id",
        "future",
        "in_transit",
        "priority",
        "removed",
        "request_id",
        "seq",
        "size_bytes",
        "slo_deadline",
        "ticket",
        "workload_id",
    )

    def __init__(
        self,
        *,
        request_id: str,
        workload_id: WorkloadId,
        criticality: int,
        fairness_id: str,
        priority: int,
        size_bytes: int,
        enqueued_at: float,
        deadline: float,
        seq: int,
        slo_deadline: float = math.inf,
        ticket: Ticket | None = None,
    ) -> None:
        self.request_id = request_id
        self.workload_id = workload_id
        self.criticality = criticality
        self.fairness_id = fairness_id
        self.priority = priority
        self.size_bytes = size_bytes
        self.enqueued_at = enqueued_at
        self.deadline = deadline  # math.inf: no TTL
        self.slo_deadline = slo_deadline  # enqueue + TTFT objective; math.inf: no SLO
        self.seq = seq  # arrival order; breaks every tie so dispatch is deterministic
        self.ticket = ticket
        # Resolved by the dispatcher: None = go, a Rejection = do not.
        self.future: asyncio.Future[Rejection | None] | None = None
        self.removed = False
        self.in_transit = False  # dispatched, its caller not yet resumed

    def __repr__(self) -> str:
        return (
            f"QueueItem({self.request_id!r}, workload={self.workload_id!r}, "
            f"criticality={self.criticality}, seq={self.seq})"
        )


class ItemQueue(Protocol):
    """Queued items in the order one ordering policy dispatches them."""

    def __len__(self) -> int: ...

    def push(self, item: QueueItem, now: float) -> None: ...

    def remove(self, item: QueueItem) -> None:
        """Take out an item still in this queue (lazily: it is skipped later)."""
        ...

    def pop(self, now: float) -> QueueItem | None:
        """The item the policy dispatches first at `now`, taken out; None when empty."""
        ...

    def drain(self) -> list[QueueItem]:
        """Every live item, emptying the queue (used when the config is reloaded)."""
        ...


@runtime_checkable
class OrderingPolicy(Protocol):
    type_name: str
    name: str

    def new_queue(self, registry: WorkloadRegistry) -> ItemQueue: ...


class BandQueue(Protocol):
    """A priority band's items, across its flows."""

    def __len__(self) -> int: ...

    def push(self, item: QueueItem, now: float) -> None: ...

    def remove(self, item: QueueItem) -> None: ...

    def pop(self, now: float) -> QueueItem | None: ...

    def drain(self) -> list[QueueItem]: ...


@runtime_checkable
class FairnessPolicy(Protocol):
    type_name: str
    name: str

    def new_band(self, ordering: OrderingPolicy, registry: WorkloadRegistry) -> BandQueue: ...


@runtime_checkable
class SaturationDetector(Protocol):
    type_name: str
    name: str

    def saturation(self, endpoints: Sequence[EndpointLoad], now: float) -> float:
        """Pool saturation (the mean); >= 1.0 means full. No endpoints counts as full."""
        ...

    def endpoint_saturation(
        self, metrics: EndpointMetrics, now: float, dispatched: int = 0
    ) -> float:
        """One endpoint's saturation, counting `dispatched` requests routed there since
        its metrics were scraped; >= 1.0 means it is full (or its metrics are stale)."""
        ...

    def request_load(self) -> float:
        """What one more request adds to its endpoint's saturation until the next scrape
        shows it (so room below the ceiling lets a measured number through, not the whole
        queue at once)."""
        ...
