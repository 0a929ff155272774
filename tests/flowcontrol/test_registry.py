"""Workload registry: counts, sliding-window rates, idle cleanup, exactly-once release."""

from __future__ import annotations

import asyncio
import random

from epp import metrics
from epp.flowcontrol.registry import WorkloadRegistry
from epp.flowcontrol.workload import WorkloadId

A = WorkloadId("a")


def sample(name: str, workload_id: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, {"workload_id": workload_id})


def test_counts_and_release_exactly_once() -> None:
    registry = WorkloadRegistry()
    first = registry.arrive(A, 1.0)
    second = registry.arrive(A, 2.0)
    stats = registry.get(A)
    assert stats is not None and (stats.total, stats.active) == (2, 2)
    assert registry.release(first) and registry.release(second)
    assert not registry.release(first)
    assert (stats.total, stats.active, registry.released_twice) == (2, 0, 1)
    assert sample("workload_active_requests", "a") == 0
    assert sample("workload_total_requests", "a") == 2


def test_rate_over_the_sliding_window() -> None:
    registry = WorkloadRegistry(window_s=60.0, buckets=60)
    for i in range(120):  # 2 req/s for 60 s
        registry.arrive(A, 1000.0 + i / 2)
    assert registry.rate_of(A) == 2.0
    registry.advance(1000.0 + 89.5)  # window: buckets 1030..1089, so 30 s of arrivals left
    assert registry.rate_of(A) == 1.0
    assert sample("workload_request_rate", "a") == 1.0
    registry.advance(1000.0 + 200.0)
    assert registry.rate_of(A) == 0.0


def test_listeners_hear_every_rate_change() -> None:
    registry = WorkloadRegistry(window_s=10.0, buckets=10)
    heard: list[float] = []

    class Listener:
        def rate_changed(self, stats: object) -> None:
            heard.append(registry.rate_of(A))

    registry.arrive(A, 0.5)
    registry.get(A).listeners.append(Listener())  # type: ignore[union-attr]
    registry.arrive(A, 3.5)
    registry.advance(10.5)  # the bucket of 0.5 expires
    registry.advance(13.9)  # nothing new expires
    registry.advance(14.0)
    assert heard == [0.2, 0.1, 0.0]


def test_idle_workloads_are_forgotten_and_their_series_removed() -> None:
    registry = WorkloadRegistry(idle_timeout_s=300.0)
    ticket = registry.arrive(A, 0.0)
    registry.cleanup(1000.0)
    assert A in registry  # still active
    registry.release(ticket)
    registry.cleanup(299.0)
    assert A in registry
    assert registry.cleanup(300.0) == 1
    assert A not in registry and sample("workload_active_requests", "a") is None


def test_memory_is_bounded_by_max_workloads() -> None:
    registry = WorkloadRegistry(max_workloads=10)
    tickets = [registry.arrive(WorkloadId(f"w{i}"), 0.0) for i in range(25)]
    assert len(registry) == 11  # ten, plus `default` that takes the overflow
    assert {t.workload_id for t in tickets[10:]} == {"default"}
    for ticket in tickets:
        registry.release(ticket)
    assert registry.total_active() == 0 and registry.released_twice == 0
    registry.arrive(WorkloadId("late"), 1.0)  # idle ones make room
    assert "late" in registry


async def test_accounting_under_100_concurrent_tasks() -> None:
    registry = WorkloadRegistry()
    rng = random.Random(7)
    lowest: list[int] = []

    async def request(i: int) -> None:
        workload = WorkloadId(f"w{i % 7}")
        ticket = registry.arrive(workload, float(i))
        try:
            for _ in range(rng.randrange(5)):
                await asyncio.sleep(0)
                lowest.append(min(s.active for s in (registry.get(f"w{k}") for k in range(7)) if s))
            if i % 5 == 0:
                raise RuntimeError("upstream failed")
        finally:
            registry.release(ticket)
            if i % 9 == 0:
                registry.release(ticket)  # a buggy second release is refused

    tasks = [asyncio.create_task(request(i)) for i in range(100)]
    await asyncio.sleep(0)  # every task has arrived; some are mid-request
    for i, task in enumerate(tasks):
        if i % 11 == 0:
            task.cancel()  # client disconnects
    await asyncio.gather(*tasks, return_exceptions=True)
    assert registry.total_active() == 0
    assert min(lowest, default=0) >= 0
    assert sum(s.total for s in (registry.get(f"w{k}") for k in range(7)) if s) == 100
    assert registry.released_twice == len([i for i in range(100) if i % 9 == 0])
