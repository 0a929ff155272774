"""Fixtures for the gateway tests: aiohttp model-server stand-ins on 127.0.0.1.

Each `Backend` records every request body it receives (to check bodies arrive
byte-for-byte) and serves ``/sse`` as a stream whose events are released one at a time by
the test, so a test can prove that Envoy forwards events as they are produced: if Envoy
buffered the response, the test would wait for an event the backend never sends.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from sluice.gateway import envoy_process

SSE_EVENTS = 3


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        envoy_process.find_envoy_binary()
    except envoy_process.EnvoyError as error:
        skip = pytest.mark.skip(reason=f"needs a real Envoy: {error}")
        for item in items:
            if "envoy" in item.keywords:
                item.add_marker(skip)


@dataclass
class Backend:
    name: str
    address: str = ""  # ip:port, known once started
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    sse_release: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    sse_ended_at: list[float] = field(default_factory=list)  # time.monotonic() per stream
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if request.path == "/sse":
            return await self._sse(request)
        return web.json_response(
            {
                "pod": self.name,
                "path": request.path,
                "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            },
            headers={"x-inference-pod": self.name},
        )

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "x-inference-pod": self.name}
        )
        await response.prepare(request)
        for index in range(SSE_EVENTS):
            await response.write(f"data: {self.name} {index}\n\n".encode())
            if index < SSE_EVENTS - 1:
                await asyncio.wait_for(self.sse_release.get(), timeout=10)
        await response.write_eof()
        self.sse_ended_at.append(time.monotonic())
        return response


async def start_backend(name: str) -> Backend:
    backend = Backend(name)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    backend.runner = web.AppRunner(app, access_log=None)
    await backend.runner.setup()
    site = web.TCPSite(backend.runner, "127.0.0.1", 0)
    await site.start()
    host, port = backend.runner.addresses[0][:2]
    backend.address = f"{host}:{port}"
    return backend


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Backend, Backend]]:
    first, second = await start_backend("alpha"), await start_backend("beta")
    yield first, second
    for backend in (first, second):
        assert backend.runner is not None
        await backend.runner.cleanup()
