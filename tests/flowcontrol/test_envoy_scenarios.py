"""Flow control end to end: client -> real Envoy -> picker (flowControl gate) -> backends.

The backends' scraped metrics say when the pool is saturated. With `queueDepthThreshold:
2`, a backend reporting 1 waiting request is at saturation 0.5, where dispatch is metered:
each dispatched request counts as another 0.5 until the next scrape, so queued requests
leave one per scrape and reach the backend in dispatch order. Ordering scenarios
swap the flow controller's clock for a fake one, so "30 s later" takes no time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import yaml

from epp.picker import Picker
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from tests.flowcontrol.support import FakeClock
from tests.support.backends import Backend, backends
from tests.support.picker import fresh_metrics, running_picker, wait_for

pytestmark = pytest.mark.envoy


def flow_config(*, workload_aware: bool = True, **flow_control: object) -> str:
    """The scenarios' EndpointPickerConfig; `flow_control` adds keys to its section."""
    document: dict[str, object] = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "featureGates": ["flowControl"],
        "saturationDetector": {"queueDepthThreshold": 2, "metricsStalenessThreshold": "5s"},
        "flowControl": {"dispatchPollInterval": "5ms", **flow_control},
    }
    if workload_aware:
        document["plugins"] = [
            {
                "type": "workload-aware-ordering-policy",
                "parameters": {"slidingWindowDuration": "1s"},
            }
        ]
    return yaml.safe_dump(document)


CONFIG = flow_config()
ONE_AT_A_TIME = 1  # waiting requests a backend reports so that dispatch goes one per scrape
FCFS_CONFIG = flow_config(workload_aware=False)


@contextlib.asynccontextmanager
async def gateway(
    servers: list[Backend], config: str = CONFIG, **picker_options: object
) -> AsyncIterator[tuple[EnvoyProcess, Picker]]:
    endpoints = ",".join(s.target for s in servers)
    options: dict[str, object] = {"config_text": config, **picker_options}
    if endpoints:
        options["endpoints"] = endpoints
    async with running_picker(**options) as picker:
        gateway_options = envoy_config.GatewayOptions(
            mode=envoy_config.GatewayMode.PICKER, picker_port=picker.grpc_port
        )
        async with EnvoyProcess(gateway_options) as envoy:
            if servers:
                await fresh_metrics(picker)
            yield envoy, picker


async def post(
    session: aiohttp.ClientSession,
    envoy: EnvoyProcess,
    name: str,
    context: str | None = None,
    **kwargs: object,
) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": "application/json", "x-request-id": name}
    if context is not None:
        headers["x-workload-context"] = context
    body = orjson.dumps({"model": "m", "prompt": name})
    async with session.post(
        envoy.url + "/v1/completions", data=body, headers=headers, **kwargs
    ) as r:  # type: ignore[arg-type]
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def ctx(workload: str, criticality: int) -> str:
    return orjson.dumps({"workload_id": workload, "criticality": criticality}).decode()


def received(server: Backend) -> list[str]:
    return [orjson.loads(body)["prompt"] for body in server.state.received]


async def saturate(picker: Picker, server: Backend, waiting: int) -> None:
    server.state.waiting = waiting
    await fresh_metrics(picker)


class Traffic:
    """Requests in flight through Envoy, started one by one once the previous is queued."""

    def __init__(self, session: aiohttp.ClientSession, envoy: EnvoyProcess, picker: Picker):
        self.session, self.envoy, self.picker = session, envoy, picker
        self.tasks: list[asyncio.Task[tuple[int, dict[str, str], bytes]]] = []

    async def enqueue(self, name: str, context: str | None = None) -> None:
        flow = self.picker.flow_controller
        assert flow is not None
        before = flow.queued()
        self.tasks.append(asyncio.create_task(post(self.session, self.envoy, name, context)))
        await wait_for(lambda: flow.queued() == before + 1, what=f"{name} queued")

    async def results(self) -> list[tuple[int, dict[str, str], bytes]]:
        return await asyncio.wait_for(asyncio.gather(*self.tasks), 20)


def fake_clock(picker: Picker) -> FakeClock:
    assert picker.flow_controller is not None
    clock = FakeClock()
    picker.flow_controller.clock = clock
    return clock


async def idle(picker: Picker) -> None:
    flow = picker.flow_controller
    assert flow is not None
    await wait_for(
        lambda: (
            flow.queued() == 0 and flow.registry.total_active() == 0 and picker.in_flight.is_idle()
        ),
        what="every slot released",
    )
    assert flow.registry.released_twice == 0


async def test_criticality_1_5_3_dispatch_as_5_3_1() -> None:
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway(servers) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        clock = fake_clock(picker)
        await saturate(picker, servers[0], 5)
        traffic = Traffic(session, envoy, picker)
        for name, criticality in (("A", 1), ("B", 5), ("C", 3)):
            await traffic.enqueue(name, ctx(name.lower(), criticality))
            clock.advance(0.1)
        servers[0].state.waiting = ONE_AT_A_TIME
        results = await traffic.results()
        assert [status for status, _, _ in results] == [200, 200, 200]
        assert received(servers[0]) == ["B", "C", "A"]
        await idle(picker)


async def test_an_old_criticality_2_request_overtakes_a_new_criticality_3_one() -> None:
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway(servers) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        clock = fake_clock(picker)
        await saturate(picker, servers[0], 5)
        traffic = Traffic(session, envoy, picker)
        await traffic.enqueue("old", ctx("reports", 2))
        clock.advance(30)
        await traffic.enqueue("new", ctx("chat", 3))
        servers[0].state.waiting = ONE_AT_A_TIME
        await traffic.results()
        assert received(servers[0]) == ["old", "new"]
        await idle(picker)


async def test_a_flooding_workload_ranks_below_a_single_request() -> None:
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway(servers) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        clock = fake_clock(picker)
        flood = ctx("flood", 3)
        for i in range(100):  # 100 req/s over the 1 s window, served while there is room
            status, _, _ = await post(session, envoy, f"f{i}", flood)
            assert status == 200
            clock.advance(0.01)
        assert picker.flow_controller is not None
        assert picker.flow_controller.registry.rate_of("flood") >= 95
        await saturate(picker, servers[0], 5)
        traffic = Traffic(session, envoy, picker)
        await traffic.enqueue("flood-next", flood)
        clock.advance(0.005)
        await traffic.enqueue("single", ctx("single", 3))
        servers[0].state.waiting = ONE_AT_A_TIME
        await traffic.results()
        assert received(servers[0])[-2:] == ["single", "flood-next"]
        await idle(picker)


async def test_bad_headers_run_as_the_default_workload() -> None:
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway(servers) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        bad = ["{nope", "[]", '{"workload_id": ""}', '{"workload_id": "x", "criticality": 6}']
        for i, header in enumerate(bad):
            status, _, _ = await post(session, envoy, f"bad{i}", header)
            assert status == 200
        status, _, _ = await post(session, envoy, "none")
        assert status == 200
        async with session.get(
            f"http://127.0.0.1:{picker.metrics_port}/api/v1/workload/default/metrics"
        ) as response:
            assert response.status == 200
            view = await response.json()
        assert view["workload_id"] == "default" and view["total_requests"] == 5
        assert view["active_requests"] == 0 and view["seconds_since_last_request"] >= 0
        assert "x" not in picker.flow_controller.registry  # type: ignore[union-attr]
        async with session.get(
            f"http://127.0.0.1:{picker.metrics_port}/api/v1/workload/x/metrics"
        ) as response:
            assert response.status == 404
        await idle(picker)


async def test_full_queue_answers_429_with_retry_after() -> None:
    config = flow_config(maxRequests=1, retryAfter="7s")
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway(servers, config) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        await saturate(picker, servers[0], 5)
        traffic = Traffic(session, envoy, picker)
        await traffic.enqueue("first", ctx("a", 3))
        status, headers, body = await post(session, envoy, "second", ctx("a", 3))
        assert status == 429 and headers.get("retry-after") == "7"
        assert body.startswith(b"inference error: ResourceExhausted - flow control queue is full")
        servers[0].state.waiting = 0
        assert [s for s, _, _ in await traffic.results()] == [200]
        await idle(picker)


async def test_ttl_answers_503() -> None:
    config = flow_config(defaultRequestTTL="300ms")
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway(servers, config) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        await saturate(picker, servers[0], 5)
        status, _, body = await post(session, envoy, "late", ctx("a", 3))
        assert status == 503
        assert b"TTL" in body
        assert received(servers[0]) == []
        await idle(picker)


async def test_a_client_that_disconnects_while_queued_releases_its_slot() -> None:
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway(servers) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        await saturate(picker, servers[0], 5)
        flow = picker.flow_controller
        assert flow is not None
        task = asyncio.create_task(post(session, envoy, "leaver", ctx("a", 3)))
        await wait_for(lambda: flow.queued() == 1, what="queued")
        task.cancel()  # the client closes its connection
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await idle(picker)
        servers[0].state.waiting = 0
        await fresh_metrics(picker)
        assert received(servers[0]) == []


async def test_requests_wait_for_the_first_endpoint_of_a_pool_scaled_to_zero() -> None:
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway([], pool_name="pool", pool_namespace="ns") as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        picker.reconciler.apply(
            {
                "apiVersion": "inference.networking.k8s.io/v1",
                "kind": "InferencePool",
                "metadata": {"name": "pool", "namespace": "ns"},
                "spec": {
                    "selector": {"matchLabels": {"app": "vllm"}},
                    "targetPorts": [{"number": servers[0].port}],
                    "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
                },
            }
        )
        traffic = Traffic(session, envoy, picker)
        await traffic.enqueue("waits", ctx("a", 3))
        picker.reconciler.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p0", "namespace": "ns", "labels": {"app": "vllm"}},
                "status": {
                    "podIP": "127.0.0.2",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
        [(status, _, body)] = await traffic.results()
        assert status == 200, body
        assert received(servers[0]) == ["waits"]
        await idle(picker)


async def test_reload_keeps_queued_requests_and_gate_off_lets_them_go() -> None:
    async with (
        backends(["127.0.0.2"]) as servers,
        gateway(servers, FCFS_CONFIG) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        clock = fake_clock(picker)
        await saturate(picker, servers[0], 5)
        traffic = Traffic(session, envoy, picker)
        for name, criticality in (("A", 1), ("B", 5), ("C", 3)):
            await traffic.enqueue(name, ctx(name.lower(), criticality))
            clock.advance(0.1)
        flow = picker.flow_controller
        picker.reload_config(CONFIG, "test")  # fcfs -> workload-aware, same controller
        assert picker.flow_controller is flow and flow is not None and flow.queued() == 3
        with pytest.raises(ValueError, match="maxRequest"):
            picker.reload_config(CONFIG + "  maxRequest: 3\n", "test")
        assert flow.queued() == 3
        servers[0].state.waiting = ONE_AT_A_TIME
        await traffic.results()
        assert received(servers[0]) == ["B", "C", "A"]

        await saturate(picker, servers[0], 5)
        traffic = Traffic(session, envoy, picker)
        await traffic.enqueue("queued", ctx("a", 3))
        picker.reload_config(None, "test")  # flowControl gate off
        assert picker.flow_controller is None
        assert [s for s, _, _ in await traffic.results()] == [200]
        await wait_for(picker.in_flight.is_idle, what="release")
        assert flow.registry.total_active() == 0 and flow.registry.released_twice == 0
