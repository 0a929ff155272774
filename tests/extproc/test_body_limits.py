"""Request bodies cannot pin the picker's memory: a deadline per body, a cap on all bodies
held at once, bodies let go once routed; and an empty inference body is the picker's 400."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from epp.flowcontrol.controller import FlowController
from tests.support.backends import backends
from tests.support.extproc_client import (
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    set_headers,
)
from tests.support.picker import fresh_metrics, running_picker, wait_for

COMPLETION = orjson.dumps({"model": "m", "prompt": "hello"})


@pytest.fixture
async def pool():
    async with backends(["127.0.0.2", "127.0.0.3"]) as servers:
        endpoints = ",".join(s.target for s in servers)
        async with running_picker(
            endpoints=endpoints,
            request_body_timeout_s=0.5,
            max_body_bytes_in_flight=100_000,
        ) as picker:
            client = ExtProcClient(picker.grpc_port)
            await fresh_metrics(picker)
            yield servers, picker, client
            await client.close()


async def routes(client: ExtProcClient) -> None:
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(COMPLETION))
    assert "x-gateway-destination-endpoint" in set_headers(await call.read())
    call.cancel()


async def test_a_body_that_stops_arriving_gets_408_at_the_deadline(pool):
    _, picker, client = pool
    budget = picker.server.processor.body_budget
    call = client.open()
    await call.write(request_headers(completion_headers()))
    partial = b'{"model": "m", "prompt": "' + b"x" * 50_000
    await call.write(request_body(partial, False))
    await wait_for(lambda: budget.held == len(partial), what="the partial body held")
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await call.read()  # nothing more is sent: the picker answers at its deadline
    assert answer.immediate_response.status.code == 408
    assert b"RequestTimeout" in answer.immediate_response.body
    assert b"not complete within 0.5s of its headers" in answer.immediate_response.body
    assert loop.time() - started >= 0.3  # answered at the deadline, not at once
    call.cancel()
    await wait_for(lambda: picker.server.processor.open_streams == 0, what="stream closed")
    assert budget.held == 0  # its memory is let go
    assert picker.in_flight.is_idle()
    await routes(client)


async def test_bodies_beyond_the_in_flight_cap_get_503_and_nothing_leaks(pool):
    _, picker, client = pool
    budget = picker.server.processor.body_budget
    holder = client.open()
    await holder.write(request_headers(completion_headers()))
    await holder.write(request_body(b"x" * 80_000, False))
    await wait_for(lambda: budget.held == 80_000, what="the first body held")

    second = client.open()
    await second.write(request_headers(completion_headers()))
    await second.write(request_body(b"y" * 40_000, False))
    answer = await second.read()
    assert answer.immediate_response.status.code == 503
    assert b"holds 80000 bytes of request bodies in flight (limit 100000)" in (
        answer.immediate_response.body
    )
    second.cancel()
    holder.cancel()
    await wait_for(lambda: picker.server.processor.open_streams == 0, what="streams closed")
    assert budget.held == 0
    await routes(client)  # room again


async def test_a_routed_body_is_let_go(pool):
    _, picker, client = pool
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(COMPLETION))
    await call.read()
    assert picker.in_flight.in_flight == 1  # the request is in flight, its body is not held
    assert picker.server.processor.body_budget.held == 0
    call.cancel()


async def test_an_empty_inference_body_is_the_pickers_own_400(pool):
    _, _, client = pool
    call = client.open()
    await call.write(request_headers(completion_headers(), end_of_stream=True))
    answer = await call.read()
    call.cancel()
    assert answer.immediate_response.status.code == 400
    assert b"empty request body: POST /v1/completions needs a JSON body" in (
        answer.immediate_response.body
    )
    # A GET without a body is still routed.
    call = client.open()
    await call.write(request_headers({":method": "GET", ":path": "/v1/models"}, end_of_stream=True))
    assert "x-gateway-destination-endpoint" in set_headers(await call.read())
    call.cancel()


FLOW_CONTROL = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
saturationDetector: {queueDepthThreshold: 4, metricsStalenessThreshold: 5s}
"""


async def test_the_saturation_gauge_follows_an_idle_pool():
    async with backends(["127.0.0.2"]) as servers:
        servers[0].state.waiting = 4
        async with running_picker(endpoints=servers[0].target, config_text=FLOW_CONTROL) as picker:
            await fresh_metrics(picker)
            assert isinstance(picker.flow_controller, FlowController)
            url = f"http://127.0.0.1:{picker.metrics_server.port}/metrics"

            async def gauge() -> float:
                async with aiohttp.ClientSession() as session, session.get(url) as response:
                    text = await response.text()
                line = next(
                    x
                    for x in text.splitlines()
                    if x.startswith("inference_extension_flow_control_pool_saturation ")
                )
                return float(line.split()[1])

            assert await gauge() >= 1.0  # four waiting at a threshold of four: saturated
            servers[0].state.waiting = 0  # the queue drains; no request arrives
            await fresh_metrics(picker)
            assert await gauge() < 1.0
