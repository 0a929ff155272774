"""Commands run as real processes: their descendants, whether they live, their output read
line by line or through a pseudo-terminal (what a user's terminal would receive)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import re
import signal
import struct
import sys
import termios
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MARKER_VARIABLE = "SLUICE_TEST_MARKER"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def marked_environment() -> tuple[dict[str, str], str]:
    """An environment for a command whose every descendant can be found later, even one
    orphaned when its parent died: children inherit the marker variable."""
    marker = uuid.uuid4().hex
    return {**os.environ, MARKER_VARIABLE: marker}, marker


def marked_processes(marker: str) -> list[int]:
    """Live (not zombie) processes carrying `marker` in their environment."""
    needle = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environment.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def sluice_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sluice.cli", *args]


async def read_line(stream: asyncio.StreamReader, timeout_s: float = 60.0) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout_s)
    assert line, "the command exited (end of its output)"
    return line.decode().rstrip("\n")


async def lines_until(
    stream: asyncio.StreamReader, prefix: str, timeout_s: float = 60.0
) -> tuple[list[str], str]:
    """Lines read before the first one starting with `prefix`, and that line."""
    before: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        line = await read_line(stream, max(0.1, deadline - time.monotonic()))
        if line.startswith(prefix):
            return before, line
        before.append(line)


async def stop_and_reap(
    process: asyncio.subprocess.Process, signum: int, timeout_s: float = 30.0
) -> tuple[int, str, str]:
    """Send `signum` (if still running) and wait: exit status, the rest of its stdout, and
    its stderr."""
    if process.returncode is None:
        process.send_signal(signum)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, (stdout or b"").decode(), (stderr or b"").decode()


async def clean_up(process: asyncio.subprocess.Process, marker: str) -> None:
    """Whatever a test left running, gone: the command is stopped as Ctrl-C would (Envoy
    outlives a killed parent), then anything still carrying `marker` is killed."""
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()
    for pid in marked_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Terminal:
    """A pseudo-terminal a command writes its stdout to: what a user's screen receives.

    `frames()` splits what arrived at each cursor-home escape and keeps the complete
    frames (those ended by clear-to-end-of-screen), escapes removed."""

    def __init__(self, columns: int = 250, rows: int = 60) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        os.set_blocking(self.master, False)
        self.text = ""
        self._changed = asyncio.Event()

    def _on_readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: every writer closed the terminal; it stays readable forever
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.text += data.decode(errors="replace").replace("\r\n", "\n")
        self._changed.set()

    def frames(self) -> list[str]:
        parts = self.text.split("\x1b[H")[1:]
        return [_ANSI.sub("", part) for part in parts if "\x1b[J" in part]

    def last_frame(self) -> str:
        frames = self.frames()
        return frames[-1] if frames else ""

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the screen never showed it; last frame:\n{self._last()}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _last(self) -> str:
        frames = self.frames()
        return frames[-1] if frames else _ANSI.sub("", self.text[-3000:])


@contextlib.asynccontextmanager
async def in_terminal(
    command: Sequence[str],
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Terminal, str]]:
    """`command` with its stdout on a fresh pseudo-terminal (stderr piped), and the marker
    its processes carry (`marked_environment`)."""
    env, marker = marked_environment()
    terminal = Terminal()
    loop = asyncio.get_running_loop()
    loop.add_reader(terminal.master, terminal._on_readable)
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=terminal.slave,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        os.close(terminal.slave)  # the child holds its own copy
        try:
            yield process, terminal, marker
        finally:
            await clean_up(process, marker)
    finally:
        loop.remove_reader(terminal.master)
        os.close(terminal.master)
