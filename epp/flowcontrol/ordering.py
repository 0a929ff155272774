"""`fcfs-ordering-policy` (oldest first), `edf-ordering-policy` (earliest deadline first,
deadline = enqueue time + TTL) and `slo-deadline-ordering-policy` (deadline = enqueue time +
the request's TTFT objective, so that a saturated pool serves first the requests whose
objective can still be met). Items without a deadline go last, oldest first."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping

from epp import parameters
from epp.flowcontrol.interfaces import QueueItem
from epp.flowcontrol.registry import WorkloadRegistry


class FifoQueue:
    __slots__ = ("_items", "_live")

    def __init__(self) -> None:
        self._items: deque[QueueItem] = deque()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, item: QueueItem, now: float) -> None:
        self._items.append(item)
        self._live += 1

    def remove(self, item: QueueItem) -> None:
        item.removed = True
        self._live -= 1
        items = self._items
        while items and items[0].removed:
            items.popleft()

    def pop(self, now: float) -> QueueItem | None:
        items = self._items
        while items:
            item = items.popleft()
            if not item.removed:
                self._live -= 1
                return item
        return None

    def drain(self) -> list[QueueItem]:
        live = [i for i in self._items if not i.removed]
        self._items.clear()
        self._live = 0
        return live


class DeadlineQueue:
    __slots__ = ("_attribute", "_heap", "_live")

    def __init__(self, attribute: str = "deadline") -> None:
        self._attribute = attribute  # the QueueItem field that holds the deadline
        self._heap: list[tuple[float, int, QueueItem]] = []
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, item: QueueItem, now: float) -> None:
        heapq.heappush(self._heap, (getattr(item, self._attribute), item.seq, item))
        self._live += 1

    def remove(self, item: QueueItem) -> None:
        item.removed = True
        self._live -= 1
        if len(self._heap) > 2 * self._live + 64:  # mostly removed items: rebuild
            self._heap = [entry for entry in self._heap if not entry[2].removed]
            heapq.heapify(self._heap)

    def pop(self, now: float) -> QueueItem | None:
        heap = self._heap
        while heap:
            item = heapq.heappop(heap)[2]
            if not item.removed:
                self._live -= 1
                return item
        return None

    def drain(self) -> list[QueueItem]:
        live = [entry[2] for entry in sorted(self._heap) if not entry[2].removed]
        self._heap.clear()
        self._live = 0
        return live


class FcfsOrderingPolicy:
    type_name = "fcfs-ordering-policy"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> FcfsOrderingPolicy:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def new_queue(self, registry: WorkloadRegistry) -> FifoQueue:
        return FifoQueue()


class EdfOrderingPolicy:
    type_name = "edf-ordering-policy"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> EdfOrderingPolicy:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def new_queue(self, registry: WorkloadRegistry) -> DeadlineQueue:
        return DeadlineQueue()


class SloDeadlineOrderingPolicy:
    type_name = "slo-deadline-ordering-policy"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> SloDeadlineOrderingPolicy:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def new_queue(self, registry: WorkloadRegistry) -> DeadlineQueue:
        return DeadlineQueue("slo_deadline")
