"""`sluice simulate` as a child process, for the demo and benchmarks.

A child process keeps the simulators' CPU off the caller's interpreter (and GIL), as real
model servers would be. It runs in its own session so a terminal's Ctrl-C reaches only
the parent, which then stops everything in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp


def consecutive_free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A first port such that `count` consecutive ports are free right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"could not find {count} consecutive free ports")


@contextlib.asynccontextmanager
async def simulator_process(
    replicas: int,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 30.0,
    host: str = "127.0.0.1",
) -> AsyncIterator[list[str]]:
    """Start `replicas` simulated servers in one child, listening on `host` (a loopback
    address: 127.0.0.2 and up give each child its own ports); yields their `ip:port` once
    healthy."""
    base = consecutive_free_ports(replicas, host)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice.cli", "simulate", "--host", host,
        "--replicas", str(replicas), "--port", str(base), *extra_args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    addresses = [f"{host}:{base + i}" for i in range(replicas)]
    try:
        await _wait_healthy(addresses, process, startup_timeout_s)
        yield addresses
    finally:
        await terminate(process)


async def terminate(process: asyncio.subprocess.Process, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; always reaped."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()


async def _wait_healthy(
    addresses: list[str], process: asyncio.subprocess.Process, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        for address in addresses:
            while True:
                if process.returncode is not None:
                    err = await process.stderr.read() if process.stderr else b""
                    raise RuntimeError(f"simulator exited: {err.decode().strip()[-500:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://{address}/health") as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"simulator at {address} did not become healthy")
                await asyncio.sleep(0.05)
