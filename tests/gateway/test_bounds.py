"""Hostile and faulty peers through a real Envoy: every request ends, and dead endpoints
are retried where the picker listed fallbacks.

The timeouts are made small here; the defaults and why they were chosen are in
`sluice.gateway.settings.GatewayOptions`. The stub picker answers with the shipped body
modes (buffered request, streamed response) unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sluice.gateway.settings import BodyMode, DestinationCluster
from tests.gateway import ext_proc_stub as stub
from tests.gateway.conftest import Backend
from tests.gateway.harness import gateway, post, refused_port

pytestmark = pytest.mark.envoy

SHIPPED = {"request_body_mode": BodyMode.BUFFERED, "response_body_mode": BodyMode.STREAMED}
# Far longer than any timeout configured below: a request still open then has hung.
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)


def picker_answering(destination: str, *fallbacks: str) -> stub.StubBehaviour:
    return stub.StubBehaviour(
        destination=destination,
        fallbacks=fallbacks,
        full_duplex_request=False,
        full_duplex_response=False,
    )


@contextlib.asynccontextmanager
async def hung_server() -> AsyncIterator[str]:
    """A model server that accepts connections, reads what it is sent, and never answers."""
    connections: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"{host}:{port}"
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def ticking_server(events: int, interval_s: float) -> AsyncIterator[str]:
    """A model server streaming `events` SSE events, one every `interval_s`."""

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for index in range(events):
            await asyncio.sleep(interval_s)  # the model producing its next token
            await response.write(f"data: {index}\n\n".encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()


async def post_all(url: str, count: int) -> list[tuple[int, str]]:
    async def one(session: aiohttp.ClientSession) -> tuple[int, str]:
        async with session.post(url, data=b'{"model": "m", "prompt": "hi"}') as response:
            return response.status, await response.text()

    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        return await asyncio.gather(*(one(session) for _ in range(count)))


@pytest.mark.parametrize(
    ("timeouts", "body"),
    [
        ({"stream_idle_timeout_s": 0.5}, "stream timeout"),
        ({"route_timeout_s": 0.5, "stream_idle_timeout_s": 30.0}, "upstream request timeout"),
    ],
    ids=["idle", "route"],
)
async def test_requests_to_a_hung_model_server_end_with_504(
    timeouts: dict[str, float], body: str
) -> None:
    async with (
        hung_server() as address,
        gateway(picker_answering(address), **SHIPPED, **timeouts) as (envoy, picker),
    ):
        answers = await post_all(envoy.url + "/v1/completions", 10)
        await picker.wait_closed(10)  # and the picker heard every request end
    assert answers == [(504, body)] * 10


async def test_a_stream_that_keeps_sending_outlives_the_idle_timeout() -> None:
    events, interval_s, idle_s = 20, 0.1, 0.8  # the stream lasts 2.5 idle timeouts
    async with (
        ticking_server(events, interval_s) as address,
        gateway(picker_answering(address), **SHIPPED, stream_idle_timeout_s=idle_s) as (
            envoy,
            _picker,
        ),
    ):
        [(status, text)] = await post_all(envoy.url + "/v1/completions", 1)
    assert status == 200
    assert text == "".join(f"data: {index}\n\n" for index in range(events))


async def trickle(url_host: str, port: int, interval_s: float) -> str:
    """POST a 1,000-byte body one byte per `interval_s`; the status line Envoy answers."""
    reader, writer = await asyncio.open_connection(url_host, port)
    head = (
        "POST /v1/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        "content-length: 1000\r\n\r\n"
    )
    writer.write(head.encode())

    async def send_slowly() -> None:
        for _ in range(1000):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(interval_s)

    sender = asyncio.create_task(send_slowly())
    try:
        status_line = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT.total)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()
    return status_line.decode().strip()


@pytest.mark.parametrize("body_mode", [BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED])
async def test_a_trickling_client_gets_408_at_the_request_deadline(
    backends: tuple[Backend, Backend], body_mode: BodyMode
) -> None:
    # Each byte resets the idle timer; only the request deadline ends the upload.
    behaviour = stub.StubBehaviour(
        destination=backends[0].address,
        full_duplex_request=body_mode is BodyMode.FULL_DUPLEX_STREAMED,
        full_duplex_response=False,
    )
    options: dict[str, Any] = {
        "request_body_mode": body_mode,
        "response_body_mode": BodyMode.STREAMED,
        "request_timeout_s": 1.0,
        "message_timeout_s": 0.5,
        "stream_idle_timeout_s": 10.0,
    }
    async with gateway(behaviour, **options) as (envoy, _picker):
        host, port = envoy.url.removeprefix("http://").rsplit(":", 1)
        status_line = await trickle(host, int(port), interval_s=0.05)
        timeouts = await envoy.stats(r"downstream_rq_timeout$")
    assert status_line == "HTTP/1.1 408 Request Timeout"
    assert timeouts["http.gateway.downstream_rq_timeout"] == 1
    assert backends[0].bodies == []


async def test_a_dead_primary_is_retried_on_the_pickers_fallback(
    backends: tuple[Backend, Backend],
) -> None:
    live = backends[1]
    body = b'{"model": "m", "prompt": "' + b"x" * 100_000 + b'"}'
    with refused_port() as port:
        dead = f"127.0.0.1:{port}"
        options = {
            **SHIPPED,
            "destination_cluster": DestinationCluster.OVERRIDE_HOST,
            "backends": (dead, live.address, backends[0].address),
        }
        async with gateway(picker_answering(dead, live.address), **options) as (envoy, _):
            answers = [await post(envoy.url + "/v1/completions", body) for _ in range(3)]
            retries = await envoy.stats(r"cluster\.pool\.upstream_rq_retry$")
    assert [status for status, _ in answers] == [200] * 3
    assert all('"pod": "beta"' in text for _, text in answers)
    assert live.bodies == [body] * 3  # the retry carried the whole body
    assert backends[0].bodies == []  # the listed fallback, not the balancer, served it
    assert retries["cluster.pool.upstream_rq_retry"] == 3


async def test_past_the_pickers_list_a_retry_goes_to_another_backend(
    backends: tuple[Backend, Backend],
) -> None:
    """A primary without fallbacks: once the list is used up, the balancer picks, and the
    previous-hosts predicate keeps it off the endpoint that just failed."""
    with refused_port() as port:
        dead = f"127.0.0.1:{port}"
        options = {
            **SHIPPED,
            "destination_cluster": DestinationCluster.OVERRIDE_HOST,
            "backends": (dead, backends[0].address),
        }
        async with gateway(picker_answering(dead), **options) as (envoy, _):
            answers = [await post(envoy.url + "/v1/completions", b"{}") for _ in range(4)]
    assert [status for status, _ in answers] == [200] * 4
    assert len(backends[0].bodies) == 4


async def test_an_original_dst_gateway_retries_the_same_endpoint_and_gives_up() -> None:
    """The ORIGINAL_DST cluster reads one address: a dead primary fails after its retries."""
    with refused_port() as port:
        dead = f"127.0.0.1:{port}"
        async with gateway(picker_answering(dead, "127.0.0.1:1"), **SHIPPED) as (envoy, _):
            status, text = await post(envoy.url + "/v1/completions", b"{}")
            stats = await envoy.stats(
                r"cluster\.pool_original_dst\.upstream_(rq_retry|cx_connect_fail)$"
            )
    assert status == 503 and "retried and the latest reset reason: remote connection" in text
    assert stats == {
        "cluster.pool_original_dst.upstream_rq_retry": 2,
        "cluster.pool_original_dst.upstream_cx_connect_fail": 3,
    }


async def test_an_unlisted_endpoint_in_override_host_mode_is_balanced_over_the_backends(
    backends: tuple[Backend, Backend],
) -> None:
    """override_host can only use endpoints the cluster knows: a destination outside
    `backends` falls to the balancing policy. Pinned so the limit stays documented."""
    options = {
        **SHIPPED,
        "destination_cluster": DestinationCluster.OVERRIDE_HOST,
        "backends": (backends[0].address,),
    }
    async with gateway(picker_answering(backends[1].address), **options) as (envoy, _):
        status, text = await post(envoy.url + "/v1/completions", b"{}")
    assert status == 200 and '"pod": "alpha"' in text
    assert backends[1].bodies == []
