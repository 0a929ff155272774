"""Runs an `EngineCore` against the wall clock on the current asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import time

from sluice.sim import engine, metrics_text

# How far modelled time may fall behind the wall clock before the loop stops catching up
# (asyncio sleeps overshoot by up to ~1 ms, which would otherwise slow short steps down).
_MAX_LAG_S = 0.05


class EngineLoop:
    """Runs an `EngineCore` in real time on the current asyncio loop.

    Every modelled duration is multiplied by `time_scale`. Token times are the modelled
    step ends, so short steps keep their modelled rate even though asyncio sleeps
    overshoot (the loop catches up, up to `_MAX_LAG_S` behind the wall clock). Time the
    model lost beyond that (a CPU too busy for the chosen time scale) adds up in `lag_s`.
    When there is nothing to run the loop waits on an event: an idle engine costs no CPU.
    """

    def __init__(self, core: engine.EngineCore, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.core = core
        self.time_scale = time_scale
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.lag_s = 0.0
        self.lora_changed_at = time.time()
        self._lora_state: tuple[list[str], list[str]] = ([], [])

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(self, request: engine.SimRequest) -> None:
        self.core.add(request, asyncio.get_running_loop().time())
        self._wake.set()

    def abort(self, request: engine.SimRequest) -> None:
        self.core.abort(request, asyncio.get_running_loop().time())

    def lora_info(self) -> metrics_text.LoraInfo:
        """Adapters running and waiting, stamped with the wall time they last changed."""
        state = (self.core.running_loras(), self.core.waiting_loras())
        if state != self._lora_state:
            self._lora_state = state
            self.lora_changed_at = time.time()
        return metrics_text.LoraInfo(
            state[0], state[1], self.core.model.max_loras, self.lora_changed_at
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        deadline: float | None = None
        while True:
            now = loop.time()
            step = core.begin_step(now)
            if step is None:
                deadline = None
                self._wake.clear()
                await self._wake.wait()
                continue
            if deadline is None:
                start = now
            else:
                start = max(deadline, now - _MAX_LAG_S)
                self.lag_s += start - deadline  # > 0 only when the CPU cannot keep up
            start = max(start, step.latest_arrival_s)
            deadline = start + step.duration_s * self.time_scale
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            core.end_step(step, deadline)
