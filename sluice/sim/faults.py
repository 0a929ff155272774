"""Failure injection for one simulated server, for robustness tests of what sits in front.

* Error rate: `failure_rate` of inference requests (after validation) is answered at once
  with `failure_status`, chosen by a generator seeded from `seed` and the pod name, so a
  run is repeatable.
* Slow start: for `slow_start_s` wall seconds after start, the server answers 503 (as a
  server still loading its model would, were it listening).
* Silence: `set_silent(True)` (also `POST /sim/silence`, or `silent_after_s` after
  start). A silent server accepts connections and answers nothing: handlers wait in
  `hold()` and streams stop between chunks. Lifting silence lets everything continue.

Times here are wall seconds, not scaled by the simulator's time scale: they describe the
process, not the modelled GPU.
"""

from __future__ import annotations

import asyncio
import logging
import random

log = logging.getLogger(__name__)


class FaultInjector:
    def __init__(
        self,
        *,
        pod_name: str,
        failure_rate: float = 0.0,
        slow_start_s: float = 0.0,
        silent_after_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.pod_name = pod_name
        self.failure_rate = failure_rate
        self.slow_start_s = slow_start_s
        self.silent_after_s = silent_after_s
        self.failures_injected = 0
        self._rng = random.Random(f"{seed}:{pod_name}")
        self._audible = asyncio.Event()
        self._audible.set()
        self._ready_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready_at = loop.time() + self.slow_start_s
        if self.silent_after_s > 0:
            self._timer = loop.call_later(self.silent_after_s, self.set_silent, True)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._audible.set()  # release held handlers so shutdown can finish them

    @property
    def silent(self) -> bool:
        return not self._audible.is_set()

    def set_silent(self, silent: bool) -> None:
        if silent == self.silent:
            return
        if silent:
            self._audible.clear()
        else:
            self._audible.set()
        log.info("%s: %s", self.pod_name, "silent" if silent else "answering again")

    @property
    def starting(self) -> bool:
        return asyncio.get_running_loop().time() < self._ready_at

    async def hold(self) -> None:
        """Return at once unless silent; then wait until silence is lifted."""
        if not self._audible.is_set():
            await self._audible.wait()

    def should_fail(self) -> bool:
        if self.failure_rate > 0 and self._rng.random() < self.failure_rate:
            self.failures_injected += 1
            return True
        return False
