"""A real HTTP server on 127.0.0.x that serves a Prometheus page the test controls."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

from aiohttp import web


class FakeModelServer:
    """Serves `page` at `/metrics` with `status`; can hang, stop and restart on its port."""

    def __init__(self, page: str = "", host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.page = page
        self.status = 200
        self.hang = False
        self.chunked = False
        self.request_times: list[float] = []
        self.paths: list[str] = []
        self.accept_headers: list[str] = []
        self._changed = asyncio.Condition()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def requests(self) -> int:
        return len(self.request_times)

    async def start(self) -> int:
        """Listen (on the same port as before, after a stop) and return the port."""
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._release.clear()
        return self.port

    async def stop(self) -> None:
        self._release.set()  # let hanging handlers finish so shutdown is quick
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_requests(self, count: int, timeout_s: float = 5.0) -> None:
        """Wait until the server has been asked at least `count` times in all."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self.requests >= count)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.request_times.append(time.monotonic())
        self.paths.append(request.path_qs)
        self.accept_headers.append(request.headers.get("Accept", ""))
        async with self._changed:
            self._changed.notify_all()
        if self.hang:
            with contextlib.suppress(asyncio.CancelledError):
                await self._release.wait()
        if self.chunked:
            response = web.StreamResponse(status=self.status)
            response.enable_chunked_encoding()
            response.content_type = "text/plain"
            await response.prepare(request)
            data = self.page.encode()
            for i in range(0, len(data), 1000):
                await response.write(data[i : i + 1000])
            await response.write_eof()
            return response
        return web.Response(
            status=self.status,
            text=self.page,
            content_type="text/plain",
            charset="utf-8",
        )


async def eventually(
    check: Callable[[], bool], what: str, timeout_s: float = 5.0, poll_s: float = 0.005
) -> None:
    """Poll `check` until it holds, failing with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(poll_s)
