"""Two `sluice picker` processes behind one Envoy, as replicas run: Envoy spreads the
requests' ext_proc streams over both, and each replica subscribes to every simulated
server's KV events itself (the servers bind their publishers, each picker connects per
pod; one collector address could not be bound by two pickers).

Each shared prefix is first served by one server directly, so neither replica routed it:
a replica can only know where it is cached from the servers' events. With the precise
index every follow-up, whichever replica routes it, goes to that server; with the
approximate index (each replica learns only from its own routing) the replicas guess, and
the guesses land elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port
from sluice.sim import config as sim_config
from sluice.sim import engine, kv_publisher
from sluice.sim.server import SimulatedServer
from tests.support import tiny_tokenizer
from tests.support.picker import precise_picker_config
from tests.support.picker_process import KV_EVENTS, REQUESTS, PickerProcess, picker_process

pytestmark = pytest.mark.envoy

BLOCK = 16
DOCS = Path(__file__).resolve().parents[2] / "docs"
TEXT = (DOCS / "configuration.md").read_text()
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")  # one loopback address per server
PREFIXES = [TEXT[i * 1000 : i * 1000 + 600] for i in range(6)]  # ~8 blocks each
STORED = {"outcome": "BlockStored"}

_APPROXIMATE = f"""
- {{type: approx-prefix-cache-producer, parameters: {{blockSizeTokens: {BLOCK}}}}}
- {{type: prefix-cache-scorer}}
- {{type: queue-scorer}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 10}}
  - {{pluginRef: queue-scorer, weight: 1}}
"""


def picker_config(index: str, tok_dir: Path, events_port: int) -> str:
    head = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
    if index == "precise":
        return precise_picker_config(f"{{mode: connect, port: {events_port}}}", "tiny", tok_dir)
    return head + "plugins:" + _APPROXIMATE


@dataclass(frozen=True, slots=True)
class Pool:
    envoy: EnvoyProcess
    replicas: tuple[PickerProcess, PickerProcess]
    servers: tuple[SimulatedServer, ...]
    session: aiohttp.ClientSession


@contextlib.asynccontextmanager
async def pool(index: str, tok_dir: Path, workdir: Path) -> AsyncIterator[Pool]:
    """Three servers (each binds its KV-event publisher on its own address, one port),
    two picker processes, one Envoy with both pickers in its ext_proc cluster."""
    events_port = free_tcp_port()
    perf = engine.PerformanceModel(block_size=BLOCK, kv_cache_blocks=256, ttft_ms=1.0,
                                   prefill_ms_per_token=0.0, itl_ms=1.0)  # fmt: skip
    servers = tuple(
        SimulatedServer(
            sim_config.SimConfig(
                model="tiny",
                tokenizer=str(tok_dir),
                performance=perf,
                default_max_tokens=1,
                kv_events=kv_publisher.KvEventsConfig(f"tcp://{host}:{events_port}", bind=True),
            ),
            pod_name=f"sim-{i}",
            host=host,
        )
        for i, host in enumerate(HOSTS)
    )
    config = workdir / f"{index}.yaml"
    config.write_text(picker_config(index, tok_dir, events_port))
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        endpoints = [s.address for s in servers]
        first = await stack.enter_async_context(picker_process(endpoints, config))
        second = await stack.enter_async_context(picker_process(endpoints, config))
        options = envoy_config.GatewayOptions(
            picker_endpoints=(("127.0.0.1", first.grpc_port), ("127.0.0.1", second.grpc_port))
        )
        envoy = await stack.enter_async_context(EnvoyProcess(options))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Pool(envoy, (first, second), servers, session)


async def complete(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    """POST a completion; the pod that answered."""
    body = orjson.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1})
    async with session.post(
        url + "/v1/completions", data=body, headers={"content-type": "application/json"}
    ) as response:
        assert response.status == 200, await response.text()
        return response.headers["x-inference-pod"]


async def stored(pool: Pool) -> list[float]:
    return [await r.counter(pool.session, KV_EVENTS, **STORED) for r in pool.replicas]


async def events_applied(pool: Pool, before: list[float], timeout_s: float = 1.0) -> bool:
    """Poll both pickers' /metrics (a process signals nothing else) until each applied a
    BlockStored event beyond `before`; False if one has not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(now > then for now, then in zip(await stored(pool), before, strict=True)):
            return True
        await asyncio.sleep(0.02)
    return False


async def subscribed(pool: Pool) -> None:
    """Serve warm-up prompts on each server directly until both pickers apply its events:
    ZMQ drops what a publisher sends before a subscriber's connection is up."""
    for server in pool.servers:
        for attempt in range(40):
            before = await stored(pool)
            await complete(pool.session, server.url, f"warm-up {attempt} {server.pod_name} " * 20)
            if await events_applied(pool, before):
                break
        else:
            raise AssertionError(f"{server.pod_name}'s KV events never reached both pickers")


async def routed_by(pool: Pool, prompt: str) -> tuple[str, int]:
    """Send `prompt` through Envoy: the pod that answered and the replica (0 or 1) that
    routed it, read off the replicas' own request counters."""
    before = [await r.counter(pool.session, REQUESTS) for r in pool.replicas]
    pod = await complete(pool.session, pool.envoy.url, prompt)
    after = [await r.counter(pool.session, REQUESTS) for r in pool.replicas]
    [replica] = [i for i in range(2) if after[i] > before[i]]
    assert after[replica] == before[replica] + 1 and after[1 - replica] == before[1 - replica]
    return pod, replica


async def follow_ups(pool: Pool, events: bool) -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """Each prefix served once, directly, by a server of its own (round robin over them),
    then (`events`: once both pickers applied its BlockStored) follow-ups through Envoy
    until both replicas have routed some of each prefix's. The holder of each prefix, and
    (prefix, replica, pod) of every follow-up."""
    holders: dict[int, str] = {}
    for i, prefix in enumerate(PREFIXES):
        server = pool.servers[i % len(pool.servers)]
        before = await stored(pool)
        holders[i] = await complete(pool.session, server.url, prefix + " First?")
        if events:
            assert await events_applied(pool, before, timeout_s=10), "events never arrived"
    routed: list[tuple[int, int, str]] = []
    for question in range(8):
        # The order rotates each round: however Envoy alternates, a prefix meets both.
        for i in [(question + k) % len(PREFIXES) for k in range(len(PREFIXES))]:
            if {r for p, r, _ in routed if p == i} == {0, 1}:
                continue
            pod, replica = await routed_by(pool, PREFIXES[i] + f" Question {question}?")
            routed.append((i, replica, pod))
    for i in holders:
        assert {r for p, r, _ in routed if p == i} == {0, 1}, f"prefix {i}: one replica only"
    return holders, routed


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer.write(tmp_path_factory.mktemp("tok") / "tiny")


async def test_precise_replicas_route_a_prefix_to_its_holder_whichever_routes_it(
    tok_dir: Path, tmp_path: Path
) -> None:
    async with pool("precise", tok_dir, tmp_path) as p:
        await subscribed(p)
        holders, routed = await follow_ups(p, events=True)
    wrong = [(i, replica, pod) for i, replica, pod in routed if pod != holders[i]]
    assert not wrong, f"follow-ups not sent to the prefix's holder {holders}: {wrong}"


async def test_approximate_replicas_that_never_saw_a_prefix_send_it_elsewhere(
    tok_dir: Path, tmp_path: Path
) -> None:
    """The contrast: without the servers' events a replica can only guess (ties are broken
    at random among three servers), so some follow-up misses its prefix's holder. All of
    them hitting it by chance has a probability of (1/3)^12 per run."""
    async with pool("approximate", tok_dir, tmp_path) as p:
        holders, routed = await follow_ups(p, events=False)
    assert any(pod != holders[i] for i, _, pod in routed)
