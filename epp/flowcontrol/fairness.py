"""Fairness policies: how a priority band's flows share dispatch.

* `global-strict-fairness-policy`: one queue for the whole band, so the ordering policy's
  best item leaves first whatever flow it belongs to (with `workload-aware-ordering-policy`
  this is the global highest score).
* `round-robin-fairness-policy`: one queue per flow (fairness id); non-empty flows take
  turns, each giving its ordering policy's best item.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from epp import parameters
from epp.flowcontrol.interfaces import ItemQueue, OrderingPolicy, QueueItem
from epp.flowcontrol.registry import WorkloadRegistry


class GlobalStrictFairnessPolicy:
    type_name = "global-strict-fairness-policy"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> GlobalStrictFairnessPolicy:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def new_band(self, ordering: OrderingPolicy, registry: WorkloadRegistry) -> ItemQueue:
        return ordering.new_queue(registry)


class RoundRobinBand:
    __slots__ = ("_flows", "_live", "_make", "_turns")

    def __init__(self, ordering: OrderingPolicy, registry: WorkloadRegistry) -> None:
        self._make = lambda: ordering.new_queue(registry)
        self._flows: dict[str, ItemQueue] = {}
        self._turns: deque[str] = deque()  # non-empty flows, next to dispatch first
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, item: QueueItem, now: float) -> None:
        queue = self._flows.get(item.fairness_id)
        if queue is None:
            queue = self._flows[item.fairness_id] = self._make()
        if not queue:
            self._turns.append(item.fairness_id)
        queue.push(item, now)
        self._live += 1

    def remove(self, item: QueueItem) -> None:
        queue = self._flows[item.fairness_id]
        queue.remove(item)
        self._live -= 1
        if not queue:
            self._turns.remove(item.fairness_id)
            del self._flows[item.fairness_id]

    def pop(self, now: float) -> QueueItem | None:
        while self._turns:
            flow = self._turns.popleft()
            queue = self._flows[flow]
            item = queue.pop(now)
            if queue:
                self._turns.append(flow)
            else:
                del self._flows[flow]
            if item is not None:
                self._live -= 1
                return item
        return None

    def drain(self) -> list[QueueItem]:
        items = [i for q in self._flows.values() for i in q.drain()]
        self._flows.clear()
        self._turns.clear()
        self._live = 0
        return sorted(items, key=lambda i: i.seq)


class RoundRobinFairnessPolicy:
    type_name = "round-robin-fairness-policy"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> RoundRobinFairnessPolicy:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def new_band(self, ordering: OrderingPolicy, registry: WorkloadRegistry) -> RoundRobinBand:
        return RoundRobinBand(ordering, registry)
