"""Helpers shared by the gateway tests: a stub picker behind a real Envoy, HTTP shortcuts."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc

from sluice.gateway import envoy_process
from sluice.gateway.settings import BodyMode, GatewayOptions
from tests.gateway import ext_proc_stub as stub
from tests.gateway.conftest import Backend

FULL_DUPLEX = BodyMode.FULL_DUPLEX_STREAMED


@contextlib.asynccontextmanager
async def gateway(
    behaviour: stub.StubBehaviour,
    credentials: grpc.ServerCredentials | None = None,
    **options: Any,
) -> AsyncIterator[tuple[envoy_process.EnvoyProcess, stub.StubPicker]]:
    server, port, picker = await stub.serve(behaviour, credentials)
    # The stub answers as a full-duplex picker unless a test says otherwise.
    modes = {"request_body_mode": FULL_DUPLEX, "response_body_mode": FULL_DUPLEX}
    try:
        async with envoy_process.EnvoyProcess(
            GatewayOptions(picker_port=port, **{**modes, **options})
        ) as e:
            yield e, picker
    finally:
        await stub.stop(server)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port that is bound (so nobody else gets it) but not listening: connects fail."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def post(url: str, body: bytes, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, **kwargs) as r:
        return r.status, await r.text()


async def read_sse_releasing_each(
    session: aiohttp.ClientSession,
    url: str,
    backend: Backend | tuple[Backend, ...],
    headers: dict[str, str],
) -> list[str]:
    """Read `/sse` event by event, letting the backend (or whichever of several serves the
    request) produce the next event only after the previous one reached the client.
    Hangs, and times out, if anything on the way buffers the response."""
    serving = backend if isinstance(backend, tuple) else (backend,)
    events: list[str] = []
    timeout = aiohttp.ClientTimeout(total=15, sock_read=5)
    async with session.post(url + "/sse", data=b"{}", headers=headers, timeout=timeout) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if line:
                events.append(line)
                for candidate in serving:
                    candidate.sse_release.put_nowait(None)
    return events
