"""HTTP server on the metrics port: Prometheus `/metrics`, and per-workload numbers as JSON
at `/api/v1/workload/<workload_id>/metrics` for people debugging priorities."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp import metrics
from epp.flowcontrol.registry import WorkloadView


def _metrics_handler(
    before_render: Callable[[], None] | None,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    # One render at a time, in a thread: the request path keeps the event loop while a
    # page is built, and concurrent scrapers share one render instead of each starting one.
    lock = asyncio.Lock()

    async def handle(request: web.Request) -> web.Response:
        async with lock:
            if before_render is not None:
                before_render()
            body = await asyncio.to_thread(generate_latest, metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


def _workload_handler(
    workloads: Callable[[str], WorkloadView | None],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.Response:
        workload_id = request.match_info["workload_id"]
        view = workloads(workload_id)
        if view is None:
            return web.json_response(
                {
                    "error": f"no active workload {workload_id!r} (unknown, idle, or flow "
                    "control is off)"
                },
                status=404,
            )
        return web.json_response(dataclasses.asdict(view))

    return handle


class MetricsServer:
    def __init__(
        self,
        host: str,
        port: int,
        workloads: Callable[[str], WorkloadView | None] | None = None,
        before_render: Callable[[], None] | None = None,
    ) -> None:
        self.app = web.Application()
        self.app.router.add_get("/metrics", _metrics_handler(before_render))
        if workloads is not None:
            self.app.router.add_get(
                "/api/v1/workload/{workload_id}/metrics",
                _workload_handler(workloads),
            )
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
