"""The workload-aware queue against a brute force that rescores every item at dispatch."""

from __future__ import annotations

import math
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.flowcontrol.interfaces import QueueItem
from epp.flowcontrol.plan import WorkloadAwareSettings, score
from epp.flowcontrol.registry import WorkloadRegistry
from epp.flowcontrol.workload import WorkloadId
from epp.flowcontrol.workload_aware import WorkloadAwareQueue

WINDOW_S = 8.0
BUCKETS = 8
SETTINGS = WorkloadAwareSettings(
    wait_time_cap_s=5.0, request_rate_cap=1.0, sliding_window_s=WINDOW_S
)

# (kind, workload, criticality, time step in quarter seconds)
ops = st.lists(
    st.tuples(
        st.sampled_from(["push", "push", "push", "pop", "pop", "remove", "arrive"]),
        st.integers(0, 5),
        st.integers(1, 5),
        st.integers(0, 12),
        st.integers(0, 1_000),
    ),
    max_size=120,
)


def reference_rate(arrivals: list[float], now: float) -> float:
    """Requests in the last BUCKETS buckets (the registry's documented window)."""
    width = WINDOW_S / BUCKETS
    current = math.floor(now / width)
    return sum(1 for a in arrivals if math.floor(a / width) > current - BUCKETS) / WINDOW_S


@settings(max_examples=int(os.environ.get("FLOW_PROPERTY_EXAMPLES", "300")), deadline=None)
@given(ops)
def test_every_dispatch_is_the_true_maximum(steps: list[tuple[str, int, int, int, int]]) -> None:
    registry = WorkloadRegistry(window_s=WINDOW_S, buckets=BUCKETS)
    queue = WorkloadAwareQueue(SETTINGS, registry)
    arrivals: dict[str, list[float]] = {}
    queued: list[QueueItem] = []
    now, seq = 100.0, 0
    for kind, w, criticality, step, pick in steps:
        now += step / 4
        registry.advance(now)
        workload = WorkloadId(f"w{w}")
        if kind in ("push", "arrive"):
            ticket = registry.arrive(workload, now)
            arrivals.setdefault(workload, []).append(now)
            if kind == "push":
                seq += 1
                item = QueueItem(
                    request_id=str(seq),
                    workload_id=workload,
                    criticality=criticality,
                    fairness_id=workload,
                    priority=0,
                    size_bytes=0,
                    enqueued_at=now,
                    deadline=math.inf,
                    seq=seq,
                    ticket=ticket,
                )
                queue.push(item, now)
                queued.append(item)
        elif kind == "remove" and queued:
            item = queued.pop(pick % len(queued))
            queue.remove(item)
        elif kind == "pop":
            for name, times in arrivals.items():
                assert math.isclose(
                    registry.rate_of(name), reference_rate(times, now), abs_tol=1e-12
                )
            item = queue.pop(now)
            if not queued:
                assert item is None
                continue
            assert item is not None and item in queued

            def ref(i: QueueItem, now: float = now) -> float:
                rate = reference_rate(arrivals[i.workload_id], now)
                return score(SETTINGS, now - i.enqueued_at, i.criticality, rate)

            best = max(ref(i) for i in queued)
            assert ref(item) >= best - 1e-9, (item, ref(item), best)
            queued.remove(item)
        assert len(queue) == len(queued)
    # Everything left comes out, each the best at its time, then nothing.
    while queued:
        now += 0.5
        registry.advance(now)
        item = queue.pop(now)
        assert item is not None and item in queued
        queued.remove(item)
    assert queue.pop(now) is None and len(queue) == 0


def test_rate_changes_reorder_heads_already_queued() -> None:
    """A heap keyed at insert would keep B first after B's workload starts flooding."""
    registry = WorkloadRegistry(window_s=60.0)
    queue = WorkloadAwareQueue(WorkloadAwareSettings(), registry)
    a, b = WorkloadId("a"), WorkloadId("b")
    items = []
    for i, w in enumerate((a, b)):
        ticket = registry.arrive(w, 10.0)
        items.append(
            QueueItem(
                request_id=w,
                workload_id=w,
                criticality=3,
                fairness_id=w,
                priority=0,
                size_bytes=0,
                enqueued_at=10.0 + i * 0.001,
                deadline=math.inf,
                seq=i,
                ticket=ticket,
            )
        )
        queue.push(items[-1], 10.0)
    for _ in range(3000):  # b floods: 50 req/s over the window
        registry.arrive(b, 11.0)
    assert queue.pop(12.0) is items[0]


def test_capped_wait_lets_criticality_decide() -> None:
    registry = WorkloadRegistry()
    queue = WorkloadAwareQueue(WorkloadAwareSettings(), registry)
    old = QueueItem(
        request_id="old",
        workload_id=WorkloadId("x"),
        criticality=2,
        fairness_id="x",
        priority=0,
        size_bytes=0,
        enqueued_at=0.0,
        deadline=math.inf,
        seq=1,
        ticket=registry.arrive(WorkloadId("x"), 0.0),
    )
    new = QueueItem(
        request_id="new",
        workload_id=WorkloadId("y"),
        criticality=3,
        fairness_id="y",
        priority=0,
        size_bytes=0,
        enqueued_at=100.0,
        deadline=math.inf,
        seq=2,
        ticket=registry.arrive(WorkloadId("y"), 100.0),
    )
    queue.push(old, 0.0)
    queue.push(new, 100.0)
    # old: 0.4 + 0.16 = 0.56 (capped); new after 30 s: 0.2 + 0.24 = 0.44
    assert queue.pop(130.0) is old
