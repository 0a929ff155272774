"""What every benchmark here starts: simulated servers, pickers, Envoys, as child processes.

Benchmarks run each part in its own process so that CPU can be attributed (`cpu_seconds`)
and nothing competes for one interpreter's GIL, as in a real deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp

from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port
from sluice.sim import child_process

TICKS = os.sysconf("SC_CLK_TCK")
PYTHON = sys.executable


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def child(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process for the block's lifetime; killed on exit."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        await child_process.terminate(process)


@contextlib.asynccontextmanager
async def simulators(
    count: int, sim_args: Sequence[str] = (), host: str = "127.0.0.1"
) -> AsyncIterator[list[str]]:
    """`count` simulated vLLM servers in one child process on `host`; yields their ip:port."""
    async with child_process.simulator_process(count, sim_args, host=host) as addresses:
        yield addresses


@contextlib.asynccontextmanager
async def picker(
    endpoints: Sequence[str], extra: Sequence[str] = (), metrics_port: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`sluice picker` on static endpoints; yields the process and its ext_proc port."""
    port, health, metrics = free_tcp_port(), free_tcp_port(), metrics_port or free_tcp_port()
    async with child(
        PYTHON, "-m", "sluice.cli", "picker",
        "--endpoints", ",".join(endpoints),
        "--host", "127.0.0.1",
        "--grpc-port", str(port),
        "--grpc-health-port", str(health),
        "--metrics-port", str(metrics),
        "--secure-serving=false",
        *extra,
    ) as process:  # fmt: skip
        await wait_http(f"http://127.0.0.1:{metrics}/metrics")
        yield process, port


@contextlib.asynccontextmanager
async def direct_envoy(
    backends: Sequence[str], policy: gateway_settings.LbPolicy
) -> AsyncIterator[str]:
    """Envoy balancing over `backends` by `policy` with no picker (a baseline router);
    yields its URL."""
    options = gateway_settings.GatewayOptions(
        mode=gateway_settings.GatewayMode.DIRECT, backends=tuple(backends), lb_policy=policy
    )
    async with EnvoyProcess(options) as envoy:
        yield envoy.url


def machine_busy_seconds() -> float:
    """CPU time all cores have spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU used so far by `root`'s live descendants and itself: on a shared
    machine, busy time outside this tree is other work competing with the benchmark."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited while we looked
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    total = 0.0
    for pid in tree:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


class CpuClock:
    """CPU used since the last `lap`: the machine's outside this process tree, a picker's."""

    def __init__(self, picker_pid: int) -> None:
        self._picker_pid = picker_pid
        self._last = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        return (
            time.monotonic(),
            machine_busy_seconds(),
            tree_cpu_seconds(os.getpid()),
            cpu_seconds(self._picker_pid),
        )

    def lap(self) -> tuple[float, float]:
        """(other work, the picker) in cores since the last lap."""
        now, (wall, busy, ours, picked) = self._now(), self._last
        self._last = now
        elapsed = max(now[0] - wall, 1e-9)
        return (now[1] - busy - (now[2] - ours)) / elapsed, (now[3] - picked) / elapsed
