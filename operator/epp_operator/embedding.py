"""Runs the picker on a thread of its own, with its own asyncio loop.

kopf cancels every task of the loop it runs in when it stops, and its handlers may block
that loop for a while (API calls, retries); the request path must never wait for either.
So the picker gets a dedicated thread and loop, and everything else talks to it through
``call_soon_threadsafe`` / ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from epp.picker import Picker

T = TypeVar("T")


class PickerThread:
    """Starts a picker on its own thread; :meth:`stop` drains it and joins the thread."""

    def __init__(self, make_picker: Callable[[], Picker]) -> None:
        self._make_picker = make_picker
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._picker: Picker | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop_requested: asyncio.Event | None = None

    @property
    def picker(self) -> Picker:
        if self._picker is None:
            raise RuntimeError("the picker is not running")
        return self._picker

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the picker is not running")
        return self._loop

    def start(self, timeout_s: float = 30.0) -> Picker:
        """Start the picker and return it once its servers listen (or raise its error)."""
        self._thread = threading.Thread(target=self._run, name="sluice-picker", daemon=True)
        self._thread.start()
        self._started.result(timeout_s)
        return self.picker

    def run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the picker's loop, from any other thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop accepting, drain in-flight requests (the picker's grace period), join."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop_requested is not None:
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop))
        finally:
            loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stop_requested = asyncio.Event()
        try:
            picker = self._make_picker()
            await picker.start()
        except BaseException as error:
            self._started.set_exception(error)
            return
        self._picker = picker
        self._loop = loop
        self._started.set_result(None)
        try:
            await self._stop_requested.wait()
        finally:
            await picker.stop()
