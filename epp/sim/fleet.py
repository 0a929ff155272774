"""Many simulated servers in one process and one event loop (tests, `sluice demo`, CLI).

Servers share nothing but the loop: each has its own engine, KV cache, metrics and port.
An idle server is an aiohttp listener plus an engine task parked on an event, so a fleet
costs next to no CPU while nobody is sending traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from epp.sim import config as sim_config
from epp.sim import server as sim_server


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
    names = list(pod_names) if pod_names is not None else [
        f"{pod_name_prefix}-{i}" for i in range(len(configs))
    ]
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
