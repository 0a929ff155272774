"""Malformed streams, oversized bodies and hostile headers: a clear error, then keep serving."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random

import grpc
import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.requestcontrol.lifecycle import Lifecycle
from tests.support.backends import backends
from tests.support.extproc_client import (
    BUFFERED,
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
)
from tests.support.picker import fresh_metrics, running_picker, wait_for

COMPLETION = orjson.dumps({"model": "m", "prompt": "hello"})


@pytest.fixture
async def pool():
    async with backends(["127.0.0.2", "127.0.0.3"]) as servers:
        endpoints = ",".join(s.target for s in servers)
        async with running_picker(endpoints=endpoints, max_request_body_bytes=100_000) as picker:
            client = ExtProcClient(picker.grpc_port)
            await fresh_metrics(picker)
            yield servers, picker, client
            await client.close()


async def still_serves(client: ExtProcClient) -> None:
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(COMPLETION))
    assert "x-gateway-destination-endpoint" in set_headers(await call.read())
    call.cancel()


async def test_body_before_headers(pool):
    _, picker, client = pool
    responses = await client.exchange([request_body(COMPLETION)], 1)
    assert responses[0].immediate_response.status.code == 400
    assert b"request body chunk arrived in phase 'start'" in responses[0].immediate_response.body
    await still_serves(client)
    await wait_for(picker.in_flight.is_idle, what="the served request's release")


async def test_message_without_a_phase(pool):
    _, _, client = pool
    responses = await client.exchange([pb.ProcessingRequest()], 1)
    assert responses[0].immediate_response.status.code == 400
    assert b"no request phase" in responses[0].immediate_response.body
    await still_serves(client)


async def test_response_before_request(pool):
    _, _, client = pool
    responses = await client.exchange([response_headers(200)], 1)
    assert responses[0].immediate_response.status.code == 400
    await still_serves(client)


async def test_stream_cut_mid_body(pool):
    _, picker, client = pool
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(COMPLETION[:5], end_of_stream=False))
    call.cancel()
    await wait_for(lambda: picker.server.processor.open_streams == 0, what="stream closed")
    assert picker.in_flight.is_idle()
    await still_serves(client)


async def test_stream_cut_after_routing_releases_the_slot(pool):
    _, picker, client = pool
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(COMPLETION))
    await call.read()
    assert picker.in_flight.in_flight == 1
    call.cancel()
    await wait_for(lambda: picker.in_flight.is_idle(), what="slot released")


async def test_body_over_limit_is_413(pool):
    _, picker, client = pool
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(b"x" * 60_000, end_of_stream=False))
    await call.write(request_body(b"x" * 60_000, end_of_stream=False))
    response = await call.read()
    call.cancel()
    assert response.immediate_response.status.code == 413
    assert b"exceeds the limit of 100000 bytes" in response.immediate_response.body
    assert picker.in_flight.is_idle()
    await still_serves(client)


async def test_non_utf8_header_value(pool):
    _, _, client = pool
    headers = completion_headers(**{"x-bad": b"\xff\xfe"})
    responses = await client.exchange([request_headers(headers)], 1)
    assert responses[0].immediate_response.status.code == 400
    assert b"'x-bad' is not valid UTF-8" in responses[0].immediate_response.body
    await still_serves(client)


async def _one_request(client: ExtProcClient, kind: int, rng: random.Random) -> None:
    call = client.open()
    try:
        if kind == 0:  # good, full response
            await call.write(request_headers(completion_headers()))
            await call.write(request_body(COMPLETION))
            await call.read(), await call.read()
            await call.write(response_headers(200))
            await call.read()
            await call.write(
                response_body(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}', True)
            )
            await call.read()
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        elif kind == 1:  # bad JSON
            await call.write(request_headers(completion_headers()))
            await call.write(request_body(b"{nope"))
            assert (await call.read()).immediate_response.status.code == 400
        elif kind == 2:  # cancelled after routing, before any response
            await call.write(request_headers(completion_headers()))
            await call.write(request_body(COMPLETION))
            await call.read()
            call.cancel()
        elif kind == 3:  # cancelled mid-body
            await call.write(request_headers(completion_headers()))
            await call.write(request_body(b'{"model"', end_of_stream=False))
            call.cancel()
        else:  # upstream error, streaming cut mid-response
            await call.write(request_headers(completion_headers()))
            await call.write(request_body(COMPLETION))
            await call.read(), await call.read()
            await call.write(
                response_headers(500 if rng.random() < 0.5 else 200, "text/event-stream")
            )
            await call.read()
            await call.write(response_body(b"data: {}\n\n"))
            await call.read()
            call.cancel()
    finally:
        call.cancel()


class CompletionCounter:
    """A lifecycle plugin that counts, per request id, routings and completions."""

    type_name = "test-completion-counter"
    name = "completion-counter"

    def __init__(self) -> None:
        self.routed: collections.Counter[str] = collections.Counter()
        self.completed: collections.Counter[str] = collections.Counter()

    def pre_request(self, request, result) -> None:
        self.routed[request.request_id] += 1

    def response_complete(self, request, target, response) -> None:
        self.completed[request.request_id] += 1


async def test_ten_thousand_mixed_requests_leave_every_counter_at_zero(pool):
    _, picker, client = pool
    counter = CompletionCounter()
    pipeline = picker.director.pipeline
    lifecycle = pipeline.lifecycle
    picker.director.pipeline = dataclasses.replace(
        pipeline,
        lifecycle=Lifecycle(
            dict.fromkeys(
                [*lifecycle.pre_request_plugins, *lifecycle.response_complete_plugins, counter]
            )
        ),
    )
    rng = random.Random(7)
    kinds = [rng.randrange(5) for _ in range(10_000)]
    semaphore = asyncio.Semaphore(32)

    async def run(kind: int) -> None:
        async with semaphore:
            await _one_request(client, kind, rng)

    await asyncio.gather(*(run(k) for k in kinds))
    await wait_for(
        lambda: picker.server.processor.open_streams == 0, timeout_s=30, what="streams closed"
    )
    accounting = picker.in_flight
    assert accounting.in_flight == 0
    assert accounting.per_endpoint == {}
    # Every routed request completed exactly once, whichever way it ended.
    routed = sum(1 for kind in kinds if kind in (0, 2, 4))
    assert len(counter.routed) == routed and set(counter.routed.values()) == {1}
    assert counter.completed == counter.routed
    from epp import metrics

    assert (
        metrics.REGISTRY.get_sample_value(
            "inference_objective_running_requests", {"model_name": "m"}
        )
        == 0
    )


STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
SHIPPED = {"request_mode": BUFFERED, "response_mode": STREAMED}


async def _one_shipped_request(client: ExtProcClient, kind: int) -> None:
    """One request as the shipped gateway sends it: buffered body, streamed response that
    the picker may turn off (then Envoy closes the stream when the response ends)."""
    call = client.open()
    try:
        await call.write(request_headers(completion_headers(), **SHIPPED))
        await call.read()  # headers are answered at once when not full duplex
        if kind == 3:  # client gone before the body
            call.cancel()
            return
        body = b"{nope" if kind == 1 else COMPLETION
        await call.write(request_body(body))
        routed = await call.read()
        if kind == 1:
            assert routed.immediate_response.status.code == 400
            return
        if kind == 2:  # cancelled after routing, before any response
            call.cancel()
            return
        status = 500 if kind == 4 else 200
        await call.write(response_headers(status, "text/event-stream"))
        answer = await call.read()
        skipped = answer.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.NONE
        if not skipped:
            await call.write(response_body(b'data: {"choices":[]}\n\n'))
            await call.read()
            usage = b'data: {"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
            await call.write(response_body(usage, True))
            await call.read()
        await call.done_writing()  # the HTTP stream ended: Envoy half-closes
        assert await call.read() is grpc.aio.EOF
    finally:
        call.cancel()


async def test_ten_thousand_requests_in_the_shipped_modes_leave_every_counter_at_zero():
    async with backends(["127.0.0.2", "127.0.0.3"]) as servers:
        endpoints = ",".join(s.target for s in servers)
        async with running_picker(endpoints=endpoints, response_sample_rate=0.5) as picker:
            client = ExtProcClient(picker.grpc_port)
            await fresh_metrics(picker)
            counter = CompletionCounter()
            pipeline = picker.director.pipeline
            lifecycle = pipeline.lifecycle
            picker.director.pipeline = dataclasses.replace(
                pipeline,
                lifecycle=Lifecycle(
                    dict.fromkeys(
                        [
                            *lifecycle.pre_request_plugins,
                            *lifecycle.response_complete_plugins,
                            counter,
                        ]
                    )
                ),
            )
            rng = random.Random(11)
            kinds = [rng.randrange(5) for _ in range(10_000)]
            semaphore = asyncio.Semaphore(32)

            async def run(kind: int) -> None:
                async with semaphore:
                    await _one_shipped_request(client, kind)

            await asyncio.gather(*(run(k) for k in kinds))
            await wait_for(
                lambda: picker.server.processor.open_streams == 0, timeout_s=30, what="closed"
            )
            await client.close()
            assert picker.in_flight.is_idle()
            routed = sum(1 for kind in kinds if kind in (0, 2, 4))
            assert len(counter.routed) == routed and set(counter.routed.values()) == {1}
            assert counter.completed == counter.routed
