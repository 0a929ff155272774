"""The flow controller driven by a fake clock and a fake pool (no sleeps, no servers)."""

from __future__ import annotations

import asyncio

import pytest

from epp import metrics
from epp.errors import InferenceError
from epp.flowcontrol.controller import FlowRequest
from epp.flowcontrol.outcomes import Rejection, RejectReason
from tests.flowcontrol.support import FakePool, Recorder, admit, controller, request, until

WORKLOAD_AWARE = {"defaultPriorityBand": {"orderingPolicyRef": "workload-aware-ordering-policy"}}


async def test_fast_path_when_nothing_waits_and_the_pool_has_room() -> None:
    flow, _, _ = controller()
    admission = await admit(flow, request("a"))
    assert flow.queued() == 0 and flow.registry.total_active() == 1
    admission.release()
    admission.release()
    assert flow.registry.total_active() == 0 and flow.registry.released_twice == 1


async def test_criticality_order_b_c_a() -> None:
    flow, pool, clock = controller(WORKLOAD_AWARE)
    pool.saturate()
    rec = Recorder(flow)
    for name, criticality in (("A", 1), ("B", 5), ("C", 3)):
        await rec.enqueue(request(name, criticality=criticality))
        clock.advance(0.1)
    assert flow.dispatch_ready() == 0  # saturated: nothing leaves
    pool.free()
    assert flow.dispatch_ready() == 3
    await until(lambda: len(rec.order) == 3)
    assert rec.order == ["B", "C", "A"]
    rec.release_all()
    assert flow.registry.total_active() == 0


async def test_old_criticality_2_overtakes_new_criticality_3() -> None:
    flow, pool, clock = controller(WORKLOAD_AWARE)
    pool.saturate()
    rec = Recorder(flow)
    await rec.enqueue(request("old", criticality=2))
    clock.advance(5)
    await rec.enqueue(request("new-early", criticality=3))
    # 5 s of wait (0.033) do not make up one criticality step (0.08)...
    pool.free()
    flow.dispatch_ready()
    await until(lambda: len(rec.order) == 2)
    assert rec.order == ["new-early", "old"]

    pool.saturate()
    await rec.enqueue(request("old2", criticality=2))
    clock.advance(30)  # ...30 s (0.2) do.
    await rec.enqueue(request("new2", criticality=3))
    pool.free()
    flow.dispatch_ready()
    await until(lambda: len(rec.order) == 4)
    assert rec.order[2:] == ["old2", "new2"]


async def test_a_flooding_workload_ranks_below_a_single_request() -> None:
    flow, pool, clock = controller(WORKLOAD_AWARE)
    rec = Recorder(flow)
    for _ in range(6000):  # 100 req/s for 60 s, all let through while the pool has room
        (await admit(flow, request("f", "flood"))).release()
        clock.advance(0.01)
    assert flow.registry.rate_of("flood") == pytest.approx(100.0)
    pool.saturate()
    await rec.enqueue(request("flood-next", "flood"))
    clock.advance(1.0)  # the single request is even younger
    await rec.enqueue(request("single", "single"))
    pool.free()
    flow.dispatch_ready()
    await until(lambda: len(rec.order) == 2)
    assert rec.order == ["single", "flood-next"]


async def test_bands_dispatch_strictly_by_priority() -> None:
    flow, pool, _ = controller(WORKLOAD_AWARE)
    pool.saturate()
    rec = Recorder(flow)
    await rec.enqueue(request("low-critical", criticality=5, priority=0))
    await rec.enqueue(request("high-band", criticality=1, priority=10))
    pool.free()
    flow.dispatch_ready()
    await until(lambda: len(rec.order) == 2)
    assert rec.order == ["high-band", "low-critical"]


async def test_a_lower_priority_request_queues_behind_waiting_higher_ones() -> None:
    flow, pool, _ = controller()
    pool.saturate()
    rec = Recorder(flow)
    await rec.enqueue(request("high", priority=5))
    pool.free()  # room now, but `high` waits for the dispatcher: `low` must not jump it
    await rec.enqueue(request("low", priority=0))
    assert flow.queued() == 2
    flow.dispatch_ready()
    await until(lambda: len(rec.order) == 2)
    assert rec.order == ["high", "low"]


@pytest.mark.parametrize(
    ("flow_config", "second"),
    [
        ({"maxRequests": 2}, {}),
        ({"maxBytes": "1Ki"}, {"size_bytes": 600}),
        ({"priorityBands": [{"priority": 0, "maxRequests": 2}]}, {}),
        ({"priorityBands": [{"priority": 0, "maxBytes": "1k"}]}, {"size_bytes": 600}),
    ],
)
async def test_capacity_answers_429_with_retry_after(
    flow_config: dict[str, object], second: dict[str, int]
) -> None:
    flow, pool, _ = controller({**flow_config, "retryAfter": "3s"})
    pool.saturate()
    rec = Recorder(flow)
    await rec.enqueue(request("one", size_bytes=second.get("size_bytes", 0)))
    await rec.enqueue(request("two", size_bytes=0))
    with pytest.raises(InferenceError) as info:
        await admit(flow, request("three", size_bytes=second.get("size_bytes", 0)))
    assert (info.value.status, info.value.retry_after_s) == (429, 3)
    assert "full" in info.value.message
    assert flow.queued() == 2 and flow.registry.total_active() == 2
    pool.free()
    flow.dispatch_ready()
    await until(lambda: len(rec.order) == 2)
    rec.release_all()
    assert flow.registry.total_active() == 0


async def test_ttl_eviction_answers_503_and_releases() -> None:
    flow, pool, clock = controller({"defaultRequestTTL": "10s"})
    pool.saturate()
    rec = Recorder(flow)
    task = await rec.enqueue(request("slow"))
    clock.advance(9.9)
    flow.dispatch_ready()
    assert not task.done()
    clock.advance(0.2)
    flow.dispatch_ready()
    with pytest.raises(InferenceError) as info:
        await task
    assert info.value.status == 503 and "TTL" in info.value.message
    assert flow.queued() == 0 and flow.registry.total_active() == 0
    evicted = metrics.REGISTRY.get_sample_value(
        "inference_extension_flow_control_request_queue_duration_seconds_count",
        {"priority": "0", "outcome": "evicted"},
    )
    assert evicted and evicted >= 1


async def test_client_disconnect_while_queued_releases_the_slot() -> None:
    flow, pool, _ = controller(WORKLOAD_AWARE)
    pool.saturate()
    rec = Recorder(flow)
    gone = await rec.enqueue(request("gone", "w1"))
    await rec.enqueue(request("stays", "w2"))
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert flow.queued() == 1 and flow.registry.total_active() == 1
    assert (
        metrics.REGISTRY.get_sample_value(
            "inference_extension_flow_control_queue_size", {"priority": "0"}
        )
        == 1
    )
    pool.free()
    flow.dispatch_ready()
    await until(lambda: rec.order == ["stays"])
    rec.release_all()
    assert flow.registry.total_active() == 0


async def test_requests_wait_for_the_first_endpoint() -> None:
    pool = FakePool(endpoints=0)
    flow, _, _ = controller(pool=pool)
    rec = Recorder(flow)
    await rec.enqueue(request("first"))
    assert flow.dispatch_ready() == 0 and flow.queued() == 1
    assert metrics.REGISTRY.get_sample_value(
        "inference_extension_flow_control_pool_saturation"
    ) == float("inf")
    pool.endpoints = 1
    pool.scrape()
    assert flow.dispatch_ready() == 1
    await until(lambda: rec.order == ["first"])


async def test_stale_endpoints_count_as_saturated() -> None:
    pool = FakePool()
    pool.updated_at = 0.0  # never scraped
    flow, _, _ = controller(pool=pool)
    rec = Recorder(flow)
    await rec.enqueue(request("r"))
    assert flow.dispatch_ready() == 0
    pool.scrape()
    assert flow.dispatch_ready() == 1


async def test_sheddable_requests_are_dropped_not_queued_when_saturated() -> None:
    flow, pool, _ = controller()
    pool.saturate()
    with pytest.raises(InferenceError) as info:
        await admit(flow, request("shed", priority=-1))
    assert info.value.status == 429 and flow.queued() == 0
    assert flow.registry.total_active() == 0
    pool.free()
    (await admit(flow, request("shed", priority=-1))).release()


async def test_workload_class_concurrency_limit() -> None:
    flow, _, _ = controller()
    first = await admit(flow, request("1", "w", max_concurrent=1))
    with pytest.raises(InferenceError) as info:
        await admit(flow, request("2", "w", max_concurrent=1))
    assert info.value.status == 429 and "WorkloadClass" in info.value.message
    first.release()
    (await admit(flow, request("3", "w", max_concurrent=1))).release()
    assert flow.registry.total_active() == 0


async def test_workload_class_rate_limit_is_a_token_bucket() -> None:
    flow, _, clock = controller()

    def limited(name: str) -> FlowRequest:
        return request(name, "w", requests_per_second=2.0, burst=3)

    for i in range(3):  # the burst
        (await admit(flow, limited(f"b{i}"))).release()
    with pytest.raises(InferenceError) as info:
        await admit(flow, limited("over"))
    assert info.value.status == 429 and info.value.retry_after_s == 1
    assert "2 requests per second" in info.value.message
    clock.advance(0.5)  # one token back
    (await admit(flow, limited("next"))).release()
    with pytest.raises(InferenceError):
        await admit(flow, limited("again"))
    (await admit(flow, request("other", "x"))).release()  # other workloads are not limited
    assert flow.registry.total_active() == 0


async def test_dispatch_fills_each_endpoints_room_until_the_next_scrape() -> None:
    pool = FakePool(endpoints=2)
    flow, _, _ = controller(pool=pool)  # queueDepthThreshold 5
    pool.saturate()
    rec = Recorder(flow, pool)
    for i in range(50):
        await rec.enqueue(request(f"r{i}"))
    pool.waiting = 3  # each endpoint at saturation 0.6: room for two more at 1/5 each
    pool.scrape()
    assert flow.dispatch_ready() == 4
    assert flow.dispatch_ready() == 0  # dispatched, not routed yet: in transit
    await until(lambda: len(rec.order) == 4)
    assert flow.dispatch_ready() == 0  # routed since the scrape: counted on their endpoints
    pool.scrape()
    assert flow.dispatch_ready() == 4
    await until(lambda: len(rec.order) == 8)
    pool.free()
    assert flow.dispatch_ready() == 10  # 5 each
    rec.release_all()


async def test_one_full_endpoint_does_not_hold_back_an_idle_one() -> None:
    """Work-conserving: the gate dispatches while some endpoint has room, although the
    pool's mean saturation is at the ceiling."""
    pool = FakePool(endpoints=2)
    flow, _, _ = controller(pool=pool)
    pool.saturate()
    rec = Recorder(flow, pool)
    for i in range(10):
        await rec.enqueue(request(f"r{i}"))
    pool.waiting_each = [10, 0]  # mean saturation 1.0; the second endpoint is idle
    pool.scrape()
    assert flow.dispatch_ready() == 5
    await until(lambda: len(rec.order) == 5)
    assert flow.dispatch_ready() == 0
    rec.release_all()


async def test_round_robin_fairness_takes_turns_between_flows() -> None:
    flow, pool, _ = controller(
        {"defaultPriorityBand": {"fairnessPolicyRef": "round-robin-fairness-policy"}}
    )
    pool.saturate()
    rec = Recorder(flow)
    for name in ("a1", "a2", "a3"):
        await rec.enqueue(request(name, "a"))
    await rec.enqueue(request("b1", "b"))
    pool.free()
    flow.dispatch_ready()
    await until(lambda: len(rec.order) == 4)
    assert rec.order == ["a1", "b1", "a2", "a3"]


async def test_reconfigure_keeps_queued_requests_under_the_new_policy() -> None:
    flow, pool, clock = controller()  # fcfs
    pool.saturate()
    rec = Recorder(flow)
    for name, criticality in (("A", 1), ("B", 5), ("C", 3)):
        await rec.enqueue(request(name, criticality=criticality))
        clock.advance(0.1)
    new, _, _ = controller(WORKLOAD_AWARE)
    flow.reconfigure(new.settings)
    assert flow.queued() == 3
    pool.free()
    flow.dispatch_ready()
    await until(lambda: len(rec.order) == 3)
    assert rec.order == ["B", "C", "A"]


async def test_a_client_leaving_after_a_reload_is_taken_out_of_the_new_queue() -> None:
    flow, pool, _ = controller(WORKLOAD_AWARE)
    pool.saturate()
    rec = Recorder(flow)
    leaver = await rec.enqueue(request("leaver", criticality=5))
    await rec.enqueue(request("stays", criticality=1))
    new, _, _ = controller()  # fcfs
    flow.reconfigure(new.settings)
    leaver.cancel()
    [outcome] = await asyncio.gather(leaver, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError)
    assert flow.queued() == 1 and flow.registry.total_active() == 1
    pool.free()
    assert flow.dispatch_ready() == 1
    await until(lambda: rec.order == ["stays"])


async def test_the_dispatcher_task_lets_requests_go_when_the_pool_frees() -> None:
    flow, pool, _ = controller({"dispatchPollInterval": "1ms"})
    pool.saturate()
    flow.start()
    try:
        rec = Recorder(flow)
        task = await rec.enqueue(request("r"))
        pool.free()
        await asyncio.wait_for(task, 5)
        rec.release_all()
    finally:
        await flow.stop()
    assert flow.registry.total_active() == 0


async def test_stop_rejects_what_is_still_queued() -> None:
    flow, pool, _ = controller()
    pool.saturate()
    flow.start()
    rec = Recorder(flow)
    task = await rec.enqueue(request("r"))
    await flow.stop()
    with pytest.raises(InferenceError):
        await task
    assert flow.registry.total_active() == 0


async def test_accounting_with_100_concurrent_requests_on_every_path() -> None:
    flow, pool, clock = controller({"maxRequests": 60, "defaultRequestTTL": "5s", **WORKLOAD_AWARE})
    pool.saturate()
    rec = Recorder(flow)
    for i in range(100):
        rec.start(request(f"r{i}", f"w{i % 9}", criticality=1 + i % 5))
    await until(lambda: flow.queued() == 60, "queue full")
    assert sum(t.done() for t in rec.tasks.values()) == 40  # rejected with 429
    for i in range(0, 100, 7):
        rec.tasks[f"r{i}"].cancel()  # clients leave
    pool.waiting = 3  # saturation 0.6: two go before the next scrape
    pool.scrape()
    flow.dispatch_ready()
    clock.advance(6)
    flow.dispatch_ready()  # the rest expire
    await asyncio.gather(*rec.tasks.values(), return_exceptions=True)
    assert flow.queued() == 0
    rec.release_all()
    assert len(rec.admissions) == 2
    assert flow.registry.total_active() == 0 and flow.registry.released_twice == 0


async def test_flow_control_answers_with_outcomes_not_http() -> None:
    """The controller says why; the request path decides the status (see test_admission)."""
    flow, pool, clock = controller({"maxRequests": 1, "defaultRequestTTL": "1s"})
    pool.saturate()
    shed = await flow.admit(request("shed", priority=-1))
    assert isinstance(shed, Rejection) and shed.reason is RejectReason.SHED
    rec = Recorder(flow)
    waiting = await rec.enqueue(request("waits"))
    full = await flow.admit(request("full"))
    assert isinstance(full, Rejection) and full.reason is RejectReason.QUEUE_FULL
    assert full.retry_after_s == 1
    clock.advance(2)
    flow.dispatch_ready()
    with pytest.raises(InferenceError) as info:
        await waiting
    assert info.value.status == 503
    assert flow.registry.total_active() == 0
