"""Precise prefix routing end to end: client -> Envoy -> picker -> simulated vLLM servers
that publish their KV-cache events over ZMQ, with the same tokenizer on both sides.

A prefix served once goes back to the server that cached it; once that server has
evicted it (a tiny KV cache and other prompts sent to it directly), the prefix goes to
the server that holds it now, which the approximate index could not know."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from epp.bodies import tokenizer as tokenizing
from epp.datalayer import kv_block_index
from epp.datalayer.kv_event_extractor import KvEventsExtractor
from epp.picker import Picker
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port
from sluice.sim import config as sim_config
from sluice.sim import engine, kv_publisher
from sluice.sim.server import SimulatedServer
from tests.support import tiny_tokenizer
from tests.support.picker import fresh_metrics, precise_picker_config, running_picker, wait_for

pytestmark = pytest.mark.envoy

BLOCK = 16
DOCS = Path(__file__).resolve().parents[2] / "docs"
TEXT = (DOCS / "configuration.md").read_text() + (DOCS / "data-layer.md").read_text()
SHARED = TEXT[:900]  # ~200 tokens: a dozen blocks


@contextlib.asynccontextmanager
async def pool(
    tok_dir: Path, mode: str
) -> AsyncIterator[tuple[EnvoyProcess, Picker, list[SimulatedServer]]]:
    """Two simulators with 32-block caches and the gateway. `bind`: the picker binds one
    collector socket and the servers connect to it (map events); `connect`: each server
    binds on its own address and the picker connects to each (tag-first array events)."""
    port = free_tcp_port()
    if mode == "bind":
        source = f"{{mode: bind, bindAddress: 'tcp://127.0.0.1:{port}'}}"
        events = [kv_publisher.KvEventsConfig(f"tcp://127.0.0.1:{port}")] * 2
        hosts = ["127.0.0.1", "127.0.0.1"]
    else:
        source = f"{{mode: connect, port: {port}}}"
        hosts = ["127.0.0.2", "127.0.0.3"]
        events = [
            kv_publisher.KvEventsConfig(f"tcp://{h}:{port}", encoding="array", bind=True)
            for h in hosts
        ]
    perf = engine.PerformanceModel(
        block_size=BLOCK, kv_cache_blocks=32, ttft_ms=1.0, prefill_ms_per_token=0.0, itl_ms=1.0
    )
    servers = [
        SimulatedServer(
            sim_config.SimConfig(
                model="tiny",
                tokenizer=str(tok_dir),
                performance=perf,
                kv_events=events[i],
                default_max_tokens=1,
            ),
            pod_name=f"sim-{i}",
            host=hosts[i],
        )
        for i in range(2)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        picker = await stack.enter_async_context(
            running_picker(
                endpoints=",".join(s.address for s in servers),
                config_text=precise_picker_config(source, "tiny", tok_dir),
            )
        )
        options = envoy_config.GatewayOptions(
            mode=envoy_config.GatewayMode.PICKER, picker_port=picker.grpc_port
        )
        envoy = await stack.enter_async_context(EnvoyProcess(options))
        await fresh_metrics(picker)
        await subscribed(picker, servers)
        yield envoy, picker, servers


async def subscribed(picker: Picker, servers: list[SimulatedServer]) -> None:
    """Serve warm-up prompts directly until each server's events reach the picker: ZMQ
    drops what a publisher sends before the connection is up (as vLLM's events are lost)."""
    extractor = picker.config.plugins["kv-events-extractor"]
    assert isinstance(extractor, KvEventsExtractor)
    deadline = time.monotonic() + 10
    for i in itertools.count():
        waiting = [s for s in servers if not extractor.index.pod(f"static/{s.address}")]  # type: ignore[arg-type]
        if not waiting:
            return
        assert time.monotonic() < deadline, "no KV events reached the picker"
        for server in waiting:
            await complete(server.url, f"warm-up {i} " * 20)
        await asyncio.sleep(0.05)


async def complete(url: str, prompt: str) -> str:
    """POST a completion; the pod that answered."""
    body = orjson.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/completions", data=body, headers={"content-type": "application/json"}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return response.headers["x-inference-pod"]


def held_blocks(picker: Picker, server: SimulatedServer, prompt: str, tok_dir: Path) -> int:
    extractor = picker.config.plugins["kv-events-extractor"]
    assert isinstance(extractor, KvEventsExtractor)
    pod = extractor.index.pod(f"static/{server.address}")  # type: ignore[arg-type]
    if pod is None:
        return 0
    keys = kv_block_index.chain_keys(tokenizing.load(tok_dir).encode_text(prompt), BLOCK)
    return pod.matched(keys)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer.write(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.mark.parametrize("mode", ["bind", "connect"])
async def test_a_prefix_goes_where_it_is_cached_and_not_after_eviction(
    tok_dir: Path, mode: str
) -> None:
    async with pool(tok_dir, mode) as (envoy, picker, servers):
        by_name = {s.pod_name: s for s in servers}
        first = await complete(envoy.url, SHARED + " First question?")
        holder = by_name[first]
        other = next(s for s in servers if s is not holder)
        await wait_for(
            lambda: held_blocks(picker, holder, SHARED, tok_dir) >= 10,
            what=f"{holder.pod_name}'s BlockStored events in the picker's index",
        )
        for i in range(5):
            assert await complete(envoy.url, SHARED + f" Question {i}?") == holder.pod_name

        # The holder evicts the prefix: other prompts sent to it directly fill its cache.
        offset = 2000

        async def flooded() -> bool:
            nonlocal offset
            if held_blocks(picker, holder, SHARED, tok_dir) == 0:
                return True
            await complete(holder.url, TEXT[offset : offset + 1400])
            offset += 1400
            return False

        for _ in range(20):
            if await flooded():
                break
        await wait_for(
            lambda: held_blocks(picker, holder, SHARED, tok_dir) == 0,
            what="BlockRemoved events for the evicted prefix",
        )
        # The other server caches it (served directly, so the picker did not route it).
        await complete(other.url, SHARED + " Elsewhere?")
        await wait_for(
            lambda: held_blocks(picker, other, SHARED, tok_dir) >= 10,
            what=f"{other.pod_name}'s BlockStored events",
        )
        for i in range(3):
            assert await complete(envoy.url, SHARED + f" After {i}?") == other.pod_name


async def test_two_pickers_subscribed_to_every_server_agree(tok_dir: Path) -> None:
    """Replicas share no state: each subscribes to every server's events, and the same
    events make the same index, so both choose alike whichever of them routed."""
    async with pool(tok_dir, "connect") as (envoy, picker, servers):
        port = picker.config.data_sources[1].settings.port  # type: ignore[attr-defined]
        async with running_picker(
            endpoints=",".join(s.address for s in servers),
            config_text=precise_picker_config(f"{{mode: connect, port: {port}}}", "tiny", tok_dir),
        ) as replica:
            await fresh_metrics(replica)
            await subscribed(replica, servers)
            prompts = [TEXT[i * 700 : i * 700 + 900] for i in range(4)]
            for prompt in prompts:
                await complete(envoy.url, prompt)  # routed by the first picker only

            def held(by: Picker) -> list[int]:
                return [held_blocks(by, s, p, tok_dir) for s in servers for p in prompts]

            # The last prompt is cached somewhere (earlier ones may be evicted by now).
            await wait_for(
                lambda: held(picker)[len(prompts) - 1 :: len(prompts)] != [0, 0],
                what="the routing picker's index",
            )
            await wait_for(
                lambda: held(replica) == held(picker),
                what="the replica's index to match the routing picker's",
            )
