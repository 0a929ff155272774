"""FailOpen and FailClose through a real Envoy: picker down, late, broken or silent.

What the rendered config promises (see `sluice.gateway.envoy_config`): FailClose answers 500;
FailOpen serves the request from the pool's backends, bodies intact, once the picker health
check has noticed the picker is gone. The limits of FailOpen under full duplex are pinned
here too, so a change in Envoy's behaviour shows up as a failing test.
"""

from __future__ import annotations

import asyncio
import os
import re

import aiohttp
import grpc
import pytest

from sluice.gateway import envoy_process, ports, settings
from sluice.gateway.settings import BodyMode, FailureMode, GatewayOptions
from tests.gateway import ext_proc_stub as stub
from tests.gateway.conftest import Backend
from tests.gateway.harness import gateway, post, read_sse_releasing_each, refused_port

pytestmark = pytest.mark.envoy

HEADER = settings.DESTINATION_HEADER


async def test_fail_close_with_the_picker_down_is_a_500(backends: tuple[Backend, Backend]) -> None:
    with refused_port() as port:
        options = GatewayOptions(
            picker_port=port,
            failure_mode=FailureMode.FAIL_CLOSE,
            backends=(backends[0].address,),
        )
        async with envoy_process.EnvoyProcess(options) as envoy:
            status, _ = await post(envoy.url + "/v1/completions", b"{}")
    assert status == 500
    assert backends[0].bodies == []


async def test_fail_open_with_the_picker_down_uses_the_fallback_backends(
    backends: tuple[Backend, Backend],
) -> None:
    body = os.urandom(100 * 1024)
    with refused_port() as port:
        options = GatewayOptions(
            picker_port=port,
            failure_mode=FailureMode.FAIL_OPEN,
            backends=tuple(b.address for b in backends),
        )
        async with envoy_process.EnvoyProcess(options) as envoy:
            for _ in range(4):
                status, _ = await post(envoy.url + "/v1/completions", body)
                assert status == 200
            async with aiohttp.ClientSession() as session:
                events = await read_sse_releasing_each(session, envoy.url, backends, {})
    # Round robin over the pool (its starting point is random); the SSE went to one of them.
    posted = [b.bodies[:2] for b in backends]
    assert all(received == [body, body] for received in posted)
    assert sorted(len(b.bodies) for b in backends) == [2, 3]
    assert re.fullmatch(r"data: (alpha|beta) 0", events[0])


async def test_fail_open_without_health_checks_loses_bodies_while_the_picker_is_down(
    backends: tuple[Backend, Backend],
) -> None:
    """Without the picker health check the ext_proc stream fails only after Envoy has handed
    it the body (full duplex does not wait), so only header-only requests fall back."""
    fallback = backends[0]
    with refused_port() as port:
        options = GatewayOptions(
            picker_port=port,
            failure_mode=FailureMode.FAIL_OPEN,
            backends=(fallback.address,),
            picker_health_check_interval_s=None,
            request_body_mode=BodyMode.FULL_DUPLEX_STREAMED,
            response_body_mode=BodyMode.FULL_DUPLEX_STREAMED,
        )
        async with envoy_process.EnvoyProcess(options) as envoy:
            status, _ = await post(envoy.url + "/v1/completions", b"{}")
            assert status == 500
            async with aiohttp.ClientSession() as session, session.get(envoy.url + "/") as r:
                assert r.status == 200
    assert fallback.bodies == [b""]


async def test_requests_flow_once_a_late_picker_comes_up(backends: tuple[Backend, Backend]) -> None:
    target = backends[0]
    port = ports.free_tcp_port()
    options = GatewayOptions(  # the stub answers as a full-duplex picker
        picker_port=port,
        picker_health_check_interval_s=0.2,
        request_body_mode=BodyMode.FULL_DUPLEX_STREAMED,
        response_body_mode=BodyMode.FULL_DUPLEX_STREAMED,
    )
    async with envoy_process.EnvoyProcess(options) as envoy:
        status, _ = await post(envoy.url + "/", b"{}")
        assert status == 500  # FailClose, picker not there yet
        server = grpc.aio.server()
        picker = stub.StubPicker(stub.StubBehaviour(destination=target.address))
        stub.pb_grpc.add_ExternalProcessorServicer_to_server(picker, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            deadline = asyncio.get_running_loop().time() + 5
            while status != 200 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                status, _ = await post(envoy.url + "/", b"{}")
        finally:
            await stub.stop(server)
    assert status == 200


async def test_fail_open_without_fallback_backends_is_a_clear_503() -> None:
    with refused_port() as port:
        options = GatewayOptions(picker_port=port, failure_mode=FailureMode.FAIL_OPEN)
        async with envoy_process.EnvoyProcess(options) as envoy:
            status, text = await post(envoy.url + "/", b"{}")
    assert status == 503 and HEADER in text


@pytest.mark.parametrize(
    ("body_mode", "method", "failure_mode", "expected_status"),
    [
        # Full duplex hands body chunks to the picker without waiting for its answers, so
        # once the stream fails Envoy cannot forward the body: 500 even with FailOpen.
        (BodyMode.FULL_DUPLEX_STREAMED, "POST", FailureMode.FAIL_OPEN, 500),
        (BodyMode.FULL_DUPLEX_STREAMED, "GET", FailureMode.FAIL_OPEN, 200),
        (BodyMode.BUFFERED, "POST", FailureMode.FAIL_OPEN, 200),
        (BodyMode.FULL_DUPLEX_STREAMED, "POST", FailureMode.FAIL_CLOSE, 500),
        (BodyMode.BUFFERED, "POST", FailureMode.FAIL_CLOSE, 500),
    ],
)
async def test_picker_failing_the_stream_after_it_opened(
    backends: tuple[Backend, Backend],
    body_mode: BodyMode,
    method: str,
    failure_mode: FailureMode,
    expected_status: int,
) -> None:
    fallback = backends[1]
    behaviour = stub.StubBehaviour(destination=backends[0].address, abort_on_headers=True)
    options = {
        "failure_mode": failure_mode,
        "backends": (fallback.address,),
        "request_body_mode": body_mode,
    }
    body = os.urandom(64 * 1024) if method == "POST" else None
    async with (
        gateway(behaviour, **options) as (envoy, _picker),
        aiohttp.ClientSession() as session,
        session.request(method, envoy.url + "/v1/completions", data=body) as response,
    ):
        assert response.status == expected_status
    if expected_status == 200:  # no destination was set: the fallback route served it
        assert fallback.bodies == [body or b""]
    assert backends[0].bodies == []


@pytest.mark.parametrize(
    ("body_mode", "failure_mode", "expected_status", "body_part"),
    [
        # Full duplex: message_timeout is not enforced; only the stream idle timeout ends it.
        (BodyMode.FULL_DUPLEX_STREAMED, FailureMode.FAIL_CLOSE, 504, "stream timeout"),
        (BodyMode.FULL_DUPLEX_STREAMED, FailureMode.FAIL_OPEN, 504, "stream timeout"),
        # Buffered: message_timeout applies, and FailOpen then falls back to the pool.
        (BodyMode.BUFFERED, FailureMode.FAIL_CLOSE, 504, ""),
        (BodyMode.BUFFERED, FailureMode.FAIL_OPEN, 200, '"pod": "alpha"'),
    ],
)
async def test_a_silent_picker(
    backends: tuple[Backend, Backend],
    body_mode: BodyMode,
    failure_mode: FailureMode,
    expected_status: int,
    body_part: str,
) -> None:
    behaviour = stub.StubBehaviour(destination=backends[1].address, silent=True)
    options = {
        "request_body_mode": body_mode,
        "failure_mode": failure_mode,
        "message_timeout_s": 0.5,
        "stream_idle_timeout_s": 1.0,
        "backends": (backends[0].address,),
    }
    async with gateway(behaviour, **options) as (envoy, _picker):
        status, text = await post(envoy.url + "/v1/completions", b"{}")
        timeouts = await envoy.stats(r"ext_proc\.message_timeouts")
    assert status == expected_status and body_part in text
    assert timeouts["http.gateway.ext_proc.message_timeouts"] == (
        0 if body_mode is BodyMode.FULL_DUPLEX_STREAMED else 1
    )
