"""The progress line `sluice bench` shows on stderr while a run goes on.

On a terminal one line is redrawn in place a few times a second; otherwise (a log file, CI)
a line is written every few seconds, so a long run shows it is alive without flooding the
log. The rate is of requests finished over the last few seconds, not since the start, so a
server that slows down shows at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

TTY_INTERVAL_S = 0.25
LOG_INTERVAL_S = 5.0
RATE_WINDOW_S = 5.0


class Progress:
    def __init__(
        self,
        total: int,
        stream: TextIO,
        *,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.sent = self.completed = self.failed = 0
        self._stream = stream
        self._tty = stream.isatty()
        self.interval_s = interval_s or (TTY_INTERVAL_S if self._tty else LOG_INTERVAL_S)
        self._clock = clock
        self._started = clock()
        self._finished_at: deque[float] = deque()

    def request_sent(self) -> None:
        self.sent += 1

    def request_finished(self, ok: bool) -> None:
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        self._finished_at.append(self._clock())

    def line(self) -> str:
        now = self._clock()
        elapsed = now - self._started
        while self._finished_at and self._finished_at[0] < now - RATE_WINDOW_S:
            self._finished_at.popleft()
        window = min(RATE_WINDOW_S, elapsed)
        rate = len(self._finished_at) / window if window > 0 else 0.0
        return (
            f"sent {self.sent}/{self.total}, completed {self.completed}, failed {self.failed}, "
            f"{elapsed:.1f}s, {rate:.1f} req/s"
        )

    def show(self) -> None:
        if self._tty:
            self._stream.write(f"\r{self.line()}\x1b[K")  # erase what a longer line left
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()

    async def run(self) -> None:
        """Show the line every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.show()

    def close(self) -> None:
        """The final line, ended so that what follows starts on a line of its own."""
        self.show()
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
