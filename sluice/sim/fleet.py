"""Many simulated servers in one process and one event loop (tests, `sluice demo`, CLI).

Servers share nothing but the loop: each has its own engine, KV cache, metrics and port.
An idle server is an aiohttp listener plus an engine task parked on an event, so a fleet
costs next to no CPU while nobody is sending traffic.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sluice.sim import config as sim_config
from sluice.sim import server as sim_server

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Fleet:
    servers: tuple[sim_server.SimulatedServer, ...]

    @property
    def addresses(self) -> list[str]:
        """`host:port` of each server, in order."""
        return [s.address for s in self.servers]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def by_pod(self, pod_name: str) -> sim_server.SimulatedServer:
        for s in self.servers:
            if s.pod_name == pod_name:
                return s
        raise KeyError(pod_name)

    def __iter__(self) -> Iterator[sim_server.SimulatedServer]:
        return iter(self.servers)

    def __len__(self) -> int:
        return len(self.servers)

    def __getitem__(self, index: int) -> sim_server.SimulatedServer:
        return self.servers[index]


@contextlib.asynccontextmanager
async def run_fleet(
    servers: int | Sequence[sim_config.SimConfig] = 1,
    *,
    config: sim_config.SimConfig | None = None,
    host: str = "127.0.0.1",
    base_port: int = 0,
    pod_name_prefix: str = "sim",
    pod_names: Sequence[str] | None = None,
    shutdown_timeout_s: float = 1.0,
    access_log: bool = False,
) -> AsyncIterator[Fleet]:
    """Start simulated servers and stop them all on exit.

    `servers` is a count (each server gets `config`, default `SimConfig()`) or one
    `SimConfig` per server. Pods are named `<pod_name_prefix>-<i>` unless `pod_names`
    gives every name. With `base_port` 0
    every server binds a free port (read back from `Fleet.addresses`); otherwise they
    take consecutive ports from `base_port`, and a busy port is an error.
    """
    if isinstance(servers, int):
        if servers < 1:
            raise ValueError("a fleet needs at least one server")
        configs: Sequence[sim_config.SimConfig] = [config or sim_config.SimConfig()] * servers
    else:
        configs = servers
    names = (
        list(pod_names)
        if pod_names is not None
        else [f"{pod_name_prefix}-{i}" for i in range(len(configs))]
    )
    if len(names) != len(configs) or len(set(names)) != len(names):
        raise ValueError("pod_names must give one distinct name per server")
    started: list[sim_server.SimulatedServer] = []
    try:
        for i, cfg in enumerate(configs):
            s = sim_server.SimulatedServer(
                cfg,
                pod_name=names[i],
                host=host,
                port=base_port + i if base_port else 0,
                shutdown_timeout_s=shutdown_timeout_s,
                access_log=access_log,
            )
            await s.start()
            started.append(s)
        yield Fleet(tuple(started))
    finally:
        await asyncio.gather(*(s.stop() for s in started))


class BackgroundFleet:
    """A fleet on its own thread and event loop, for synchronous callers and for keeping
    simulators off another component's loop (e.g. a picker measured in the same process;
    they still share the GIL, so a separate `sluice simulate` process isolates better).

        with BackgroundFleet(4, config=cfg) as bg:
            requests.post(f"http://{bg.addresses[0]}/v1/completions", ...)
            bg.call(bg.fleet[0].set_silent, True)

    Server objects belong to the background loop: touch them only through `call`.
    """

    def __init__(self, servers: int | Sequence[sim_config.SimConfig] = 1, **kwargs: Any):
        self._args = (servers, kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._fleet: Fleet | None = None

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            raise RuntimeError("BackgroundFleet is not running")
        return self._fleet

    @property
    def addresses(self) -> list[str]:
        return self.fleet.addresses

    @property
    def urls(self) -> list[str]:
        return self.fleet.urls

    def call(self, fn: Callable[..., T], *args: Any, timeout_s: float = 10.0) -> T:
        """Run `fn(*args)` on the fleet's loop and return its result."""
        if self._loop is None:
            raise RuntimeError("BackgroundFleet is not running")

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout_s)

    def start(self, timeout_s: float = 30.0) -> None:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def serve() -> None:
            self._stop = asyncio.Event()
            servers, kwargs = self._args
            try:
                async with run_fleet(servers, **kwargs) as running:
                    self._fleet = running
                    self._loop = asyncio.get_running_loop()
                    started.set_result(None)
                    await self._stop.wait()
            except BaseException as e:
                if not started.done():
                    started.set_exception(e)
                raise
            finally:
                self._fleet = None

        def main() -> None:
            with contextlib.suppress(Exception):
                asyncio.run(serve())

        self._thread = threading.Thread(target=main, name="sim-fleet", daemon=True)
        self._thread.start()
        started.result(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout_s)
        self._loop = self._thread = None

    def __enter__(self) -> BackgroundFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
