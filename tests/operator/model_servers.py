"""Model-server stand-ins for pods: several 127.0.0.x addresses sharing one port.

Pods of a pool listen on the pool's target port, each on its own IP; these do the same, so
an InferencePool with one target port covers all of them. Metrics come from
:class:`tests.support.backends.BackendState`; each server counts the requests it served.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.backends import BackendState


@dataclass
class ModelServer:
    address: str
    port: int
    state: BackendState = field(default_factory=BackendState)


def _free_port(addresses: list[str]) -> int:
    with socket.socket() as probe:
        probe.bind((addresses[0], 0))
        return int(probe.getsockname()[1])


def _app(server: ModelServer) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=server.state.metrics_text(), content_type="text/plain")

    async def completions(request: web.Request) -> web.Response:
        server.state.received.append(await request.read())
        return web.json_response({"choices": [{"text": "ok"}]})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    return app


@contextlib.asynccontextmanager
async def model_servers(addresses: list[str]) -> AsyncIterator[list[ModelServer]]:
    port = _free_port(addresses)
    runners: list[web.AppRunner] = []
    servers = [ModelServer(address, port) for address in addresses]
    try:
        for server in servers:
            runner = web.AppRunner(_app(server), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, server.address, port).start()
            runners.append(runner)
        yield servers
    finally:
        for runner in runners:
            await runner.cleanup()
