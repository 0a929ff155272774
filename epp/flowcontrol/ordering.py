"""`fcfs-ordering-policy` (oldest first), `edf-ordering-policy` (earliest deadline first,
deadline = enqueue time + TTL) and `slo-deadline-ordering-policy` (deadline = enqueue time +
the request's TTFT objective, so that a saturated pool serves first the requests whose
objective can still be met; one whose objective has already passed waits behind those,
see `DeadlineQueue`). Items without a deadline go last, oldest first."""

from __future__ import annotations

import heapq
import math
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
    """Earliest deadline first; items without one (math.inf) last, oldest first. With
    `late_last`, an item whose deadline has passed when it would be served goes behind
    every item whose deadline is still ahead, oldest first among the late, but still
    ahead of items that never had one: under overload, plain EDF serves first the
    requests that have already missed and makes the next ones miss too, one after
    another."""

    __slots__ = ("_attribute", "_heap", "_late", "_late_last", "_live")

    def __init__(self, attribute: str = "deadline", *, late_last: bool = False) -> None:
        self._attribute = attribute  # the QueueItem field that holds the deadline
        self._late_last = late_last
        self._heap: list[tuple[float, int, QueueItem]] = []
        self._late: list[tuple[int, QueueItem]] = []  # past their deadline: a heap by arrival
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, item: QueueItem, now: float) -> None:
        heapq.heappush(self._heap, (getattr(item, self._attribute), item.seq, item))
        self._live += 1

    def remove(self, item: QueueItem) -> None:
        item.removed = True
        self._live -= 1
        if len(self._heap) + len(self._late) > 2 * self._live + 64:  # mostly removed: rebuild
            self._heap = [entry for entry in self._heap if not entry[2].removed]
            heapq.heapify(self._heap)
            self._late = [entry for entry in self._late if not entry[1].removed]
            heapq.heapify(self._late)

    def pop(self, now: float) -> QueueItem | None:
        heap, late = self._heap, self._late
        while heap:
            if late and heap[0][0] == math.inf:
                break  # the late ones had an objective: ahead of those that have none
            deadline, _, item = heapq.heappop(heap)
            if item.removed:
                continue
            if self._late_last and deadline < now:
                heapq.heappush(late, (item.seq, item))
                continue
            self._live -= 1
            return item
        while late:
            item = heapq.heappop(late)[1]
            if not item.removed:
                self._live -= 1
                return item
        return None

    def drain(self) -> list[QueueItem]:
        live = [entry[2] for entry in sorted(self._heap) if not entry[2].removed]
        live += [entry[1] for entry in sorted(self._late) if not entry[1].removed]
        self._heap.clear()
        self._late.clear()
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
        return DeadlineQueue("slo_deadline", late_last=True)
