"""`workload-aware-ordering-policy`: highest score first, scores taken at dispatch time.

    score = w_wait·min(wait/waitTimeCap, 1) + w_crit·criticality/5
            - w_rate·min(rate/requestRateCap, 1)

Scores move while requests wait (the wait term grows until it caps) and whenever a
workload's rate changes, so a heap keyed once at insert goes wrong. The structure here
finds the true maximum anyway, in O(log n) amortised per operation:

* Items are grouped into *lanes*, one FIFO per (workload, criticality). Within a lane the
  criticality and rate terms are equal and the oldest item has the largest wait term, so
  the lane's head is its best item (ties: oldest first). Only heads are ever compared.
* A head still *growing* (wait < cap) scores `key + w_wait·now/cap` with
  `key = w_crit·c/5 - penalty - w_wait·enqueued_at/cap`: every growing head gains the same
  amount as time passes, so their order by `key` holds until a rate changes. They sit in a
  max-heap by `key`.
* A *capped* head scores `w_wait + w_crit·c/5 - penalty`, constant until a rate changes;
  capped heads sit in a second max-heap. A third heap, by enqueue time, moves heads from
  growing to capped as they reach the cap (each head moves once).
* A workload's rate changes only on an arrival or when a window bucket expires; the
  registry tells this queue (`rate_changed`). A rate that *fell* raises the workload's
  scores, so fresh entries for its heads (at most five) are pushed at once. A rate that
  *rose* (every arrival) only lowers scores: the old entries become upper bounds, and an
  upper bound that reaches the top of a heap is re-keyed there and pushed back. The top
  is taken only when its entry is exact, and every other entry is exact or an upper
  bound, so it is the true maximum; an arrival costs O(1) instead of five pushes.
  Superseded entries are recognised by head and epoch and dropped when they reach the
  top; the heaps are rebuilt when mostly stale.

Dispatch compares the two heap tops at `now`. Property tests check every dispatch against
a brute force that recomputes every queued item's score.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Mapping

from epp.flowcontrol import plan
from epp.flowcontrol.interfaces import QueueItem
from epp.flowcontrol.plan import WorkloadAwareSettings, score
from epp.flowcontrol.registry import WorkloadRegistry, WorkloadStats
from epp.flowcontrol.workload import MAX_CRITICALITY, WorkloadId

log = logging.getLogger(__name__)


class _Lane:
    __slots__ = ("capped", "crit_term", "criticality", "items", "pushed_epoch", "workload")

    def __init__(self, workload: _Workload, criticality: int, crit_term: float) -> None:
        self.workload = workload
        self.criticality = criticality
        self.crit_term = crit_term
        self.items: deque[QueueItem] = deque()
        self.capped = False
        self.pushed_epoch = -1  # the workload epoch of the head's newest heap entry


class _Workload:
    __slots__ = ("epoch", "lanes", "penalty", "stats")

    def __init__(self, stats: WorkloadStats, penalty: float) -> None:
        self.stats = stats
        self.penalty = penalty
        self.epoch = 0
        self.lanes: dict[int, _Lane] = {}


# Heap entries: (-priority, head seq, epoch, lane). Lanes are never compared: seqs are unique.
_Entry = tuple[float, int, int, _Lane]


class WorkloadAwareQueue:
    def __init__(self, settings: WorkloadAwareSettings, registry: WorkloadRegistry) -> None:
        self._s = settings
        self._registry = registry
        self._wait_per_s = settings.wait_weight / settings.wait_time_cap_s
        self._reset()

    def _reset(self) -> None:
        self._origin: float | None = None  # keys are relative to it, for float precision
        self._workloads: dict[WorkloadId, _Workload] = {}
        self._growing: list[_Entry] = []
        self._capped: list[_Entry] = []
        self._aging: list[tuple[float, int, _Lane]] = []
        self._live = 0
        self._lanes = 0

    def __len__(self) -> int:
        return self._live

    # ---- rates ----------------------------------------------------------------------------

    def _penalty(self, stats: WorkloadStats) -> float:
        rate = self._registry.rate(stats)
        return self._s.rate_weight * min(rate / self._s.request_rate_cap, 1.0)

    def rate_changed(self, stats: WorkloadStats) -> None:
        workload = self._workloads.get(stats.workload_id)
        if workload is None or workload.stats is not stats:
            return
        penalty = self._penalty(stats)
        if penalty == workload.penalty:
            return
        rose = penalty > workload.penalty
        workload.penalty = penalty
        workload.epoch += 1
        if rose:
            return  # existing entries now overestimate: re-keyed lazily at the top
        for lane in workload.lanes.values():
            self._push_head(lane)

    # ---- entries --------------------------------------------------------------------------

    def _push_head(self, lane: _Lane) -> None:
        """Push the current head's entry (after a head or rate change)."""
        head = lane.items[0]
        workload = lane.workload
        lane.pushed_epoch = workload.epoch
        if lane.capped:
            heapq.heappush(
                self._capped,
                (workload.penalty - lane.crit_term, head.seq, workload.epoch, lane),
            )
        else:
            key = lane.crit_term - workload.penalty - self._wait_per_s * self._rel(head)
            heapq.heappush(self._growing, (-key, head.seq, workload.epoch, lane))
        if len(self._growing) + len(self._capped) > 4 * self._lanes + 64:
            self._compact()

    def _new_head(self, lane: _Lane, now: float) -> None:
        head = lane.items[0]
        lane.capped = now - head.enqueued_at >= self._s.wait_time_cap_s
        if not lane.capped:
            heapq.heappush(self._aging, (head.enqueued_at, head.seq, lane))
        self._push_head(lane)

    def _rel(self, item: QueueItem) -> float:
        assert self._origin is not None
        return item.enqueued_at - self._origin

    @staticmethod
    def _valid(entry: _Entry, capped: bool) -> bool:
        lane = entry[3]
        return (
            lane.capped is capped
            and bool(lane.items)
            and lane.items[0].seq == entry[1]
            and lane.pushed_epoch == entry[2]
        )

    def _compact(self) -> None:
        self._growing = [e for e in self._growing if self._valid(e, False)]
        self._capped = [e for e in self._capped if self._valid(e, True)]
        heapq.heapify(self._growing)
        heapq.heapify(self._capped)
        self._aging = [
            a for a in self._aging if not a[2].capped and a[2].items and a[2].items[0].seq == a[1]
        ]
        heapq.heapify(self._aging)

    def _age(self, now: float) -> None:
        """Move heads whose wait reached the cap from the growing heap to the capped one."""
        aging, limit = self._aging, now - self._s.wait_time_cap_s
        while aging and aging[0][0] <= limit:
            _, seq, lane = heapq.heappop(aging)
            if lane.capped or not lane.items or lane.items[0].seq != seq:
                continue
            lane.capped = True
            self._push_head(lane)

    # ---- queue protocol -------------------------------------------------------------------

    def push(self, item: QueueItem, now: float) -> None:
        if self._origin is None:
            self._origin = item.enqueued_at
        workload = self._workloads.get(item.workload_id)
        if workload is None:
            stats = item.ticket.stats if item.ticket is not None else None
            if stats is None:
                stats = self._registry.get(item.workload_id)
            if stats is None:  # the controller always registers first; guard for direct use
                item.ticket = self._registry.arrive(item.workload_id, now)
                stats = item.ticket.stats
            workload = _Workload(stats, self._penalty(stats))
            stats.listeners.append(self)
            self._workloads[item.workload_id] = workload
        lane = workload.lanes.get(item.criticality)
        if lane is None:
            crit_term = self._s.criticality_weight * item.criticality / MAX_CRITICALITY
            lane = workload.lanes[item.criticality] = _Lane(workload, item.criticality, crit_term)
            self._lanes += 1
        lane.items.append(item)
        self._live += 1
        if len(lane.items) == 1:
            self._new_head(lane, now)

    def remove(self, item: QueueItem) -> None:
        item.removed = True
        self._live -= 1
        workload = self._workloads[item.workload_id]
        lane = workload.lanes[item.criticality]
        if lane.items[0] is item:
            self._advance(lane, item.enqueued_at)

    def _advance(self, lane: _Lane, now: float) -> None:
        """Drop the head (and removed items behind it); publish the new head."""
        items = lane.items
        items.popleft()
        while items and items[0].removed:
            items.popleft()
        if items:
            # `now` only decides capped-or-not for the new head; _age corrects it later
            # when an older `now` is given (remove passes the removed item's time).
            self._new_head(lane, now)
            return
        workload = lane.workload
        del workload.lanes[lane.criticality]
        self._lanes -= 1
        if not workload.lanes:
            workload.stats.listeners.remove(self)
            del self._workloads[workload.stats.workload_id]

    def _top(self, heap: list[_Entry], capped: bool) -> _Entry | None:
        """The heap's exact best entry: superseded entries are dropped, upper bounds (the
        rate rose since they were pushed) re-keyed."""
        while heap:
            entry = heap[0]
            if not self._valid(entry, capped):
                heapq.heappop(heap)
                continue
            lane = entry[3]
            if entry[2] == lane.workload.epoch:
                return entry
            heapq.heappop(heap)
            self._push_head(lane)
        return None

    def peek(self, now: float) -> QueueItem | None:
        lane = self._best_lane(now)
        return lane.items[0] if lane is not None else None

    def _best_lane(self, now: float) -> _Lane | None:
        if not self._live:
            return None
        self._age(now)
        growing = self._top(self._growing, False)
        capped = self._top(self._capped, True)
        if growing is None:
            return capped[3] if capped is not None else None
        if capped is None:
            return growing[3]
        assert self._origin is not None
        growing_score = -growing[0] + self._wait_per_s * (now - self._origin)
        capped_score = -capped[0] + self._s.wait_weight
        if growing_score > capped_score or (
            growing_score == capped_score and growing[1] < capped[1]
        ):
            return growing[3]
        return capped[3]

    def pop(self, now: float) -> QueueItem | None:
        lane = self._best_lane(now)
        if lane is None:
            return None
        item = lane.items[0]
        self._live -= 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "workload-aware pick: request %s workload %r criticality %d score %.4f",
                item.request_id,
                item.workload_id,
                item.criticality,
                self.score_of(item, now),
            )
        self._advance(lane, now)
        return item

    def score_of(self, item: QueueItem, now: float) -> float:
        stats = self._registry.get(item.workload_id)
        rate = self._registry.rate(stats) if stats is not None else 0.0
        return score(self._s, now - item.enqueued_at, item.criticality, rate)

    def drain(self) -> list[QueueItem]:
        live = sorted(
            (
                i
                for w in self._workloads.values()
                for lane in w.lanes.values()
                for i in lane.items
                if not i.removed
            ),
            key=lambda i: i.seq,
        )
        for workload in self._workloads.values():
            workload.stats.listeners.remove(self)
        self._reset()
        return live


class WorkloadAwareOrderingPolicy:
    type_name = "workload-aware-ordering-policy"

    def __init__(
        self, name: str = type_name, settings: WorkloadAwareSettings | None = None
    ) -> None:
        self.name = name
        self.settings = settings or WorkloadAwareSettings()

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> WorkloadAwareOrderingPolicy:
        return cls(name, plan.parse(params))

    def new_queue(self, registry: WorkloadRegistry) -> WorkloadAwareQueue:
        return WorkloadAwareQueue(self.settings, registry)
