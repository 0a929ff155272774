"""Precise prefix routing on real vLLM: client -> Envoy -> picker -> two vLLM servers whose
KV-cache events reach the picker, which tokenizes with the tiny model's own tokenizer.

The package's two servers publish to the tests' collector socket; the picker here binds
its own collector (`mode: bind`), so this module starts two servers of its own that
connect to it (~1 min). A long prompt served once goes back to the server that cached
it; once that server has evicted it (other long prompts fill its 128-block cache), the
prompt goes to the server that holds it now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
import pytest_asyncio

from epp.bodies import tokenizer as tokenizing
from epp.datalayer import kv_block_index
from epp.datalayer.kv_event_extractor import KvEventsExtractor
from epp.picker import Picker
from sluice.gateway import envoy_config, ports
from sluice.gateway.envoy_process import EnvoyProcess
from tests.support import vllm
from tests.support.picker import fresh_metrics, precise_picker_config, running_picker, wait_for
from tests.vllm.conftest import SETTINGS

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="package")]

BLOCK = SETTINGS.block_size
# Words of the docs the tokenizer was trained on: about one token each.
_WORDS = ("pool", "endpoint", "picker", "queue", "cache", "prefix", "block", "token", "model")


def words(seed: str, count: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(count))


@dataclass(frozen=True, slots=True)
class Gateway:
    envoy: EnvoyProcess
    picker: Picker
    servers: list[vllm.VllmServer]

    @property
    def index(self) -> kv_block_index.KvBlockIndex:
        extractor = self.picker.config.plugins["kv-events-extractor"]
        assert isinstance(extractor, KvEventsExtractor)
        return extractor.index

    def held_blocks(self, server: vllm.VllmServer, tokens: list[int]) -> int:
        """How many leading blocks of `tokens` the picker's index says `server` holds."""
        pod = self.index.pod(f"static/{server.target}")  # type: ignore[arg-type]
        return 0 if pod is None else pod.matched(kv_block_index.chain_keys(tokens, BLOCK))


@pytest_asyncio.fixture(scope="module", loop_scope="package")
async def gateway() -> AsyncIterator[Gateway]:
    reason = vllm.missing_reason()
    if reason is not None:
        pytest.skip(f"needs a real vLLM: {reason}")
    collector = f"tcp://127.0.0.1:{ports.free_tcp_port('127.0.0.1')}"
    # vLLM connects (its endpoint has no `*`) and ZMQ retries until the picker has bound.
    settings = dataclasses.replace(SETTINGS, kv_events_collector=collector)
    async with contextlib.AsyncExitStack() as stack:
        servers = await stack.enter_async_context(
            vllm.vllm_servers(2, settings, addresses=["127.0.0.4", "127.0.0.5"])
        )
        picker = await stack.enter_async_context(
            running_picker(
                endpoints=",".join(s.target for s in servers),
                config_text=precise_picker_config(
                    f"{{mode: bind, bindAddress: '{collector}'}}", vllm.MODEL_NAME, vllm.MODEL
                ),
            )
        )
        options = envoy_config.GatewayOptions(
            mode=envoy_config.GatewayMode.PICKER, picker_port=picker.grpc_port
        )
        envoy = await stack.enter_async_context(EnvoyProcess(options))
        await fresh_metrics(picker)
        found = Gateway(envoy, picker, servers)
        await subscribed(found)
        yield found


async def subscribed(gateway: Gateway) -> None:
    """Serve one-block prompts directly until each server's events reach the picker: what
    vLLM publishes before the connection is up is lost."""
    for server in gateway.servers:
        for attempt in range(60):
            if gateway.index.pod(f"static/{server.target}") is not None:  # type: ignore[arg-type]
                break
            await complete(server.url, f"warm-up {attempt} " * 20)
            with contextlib.suppress(AssertionError):
                await wait_for(
                    lambda s=server: gateway.index.pod(f"static/{s.target}") is not None,  # type: ignore[misc,arg-type]
                    timeout_s=1.0,
                )
        else:
            raise AssertionError(f"no KV events from {server.target} reached the picker")


async def complete(url: str, prompt: str) -> None:
    body = {"model": vllm.MODEL_NAME, "prompt": prompt, "max_tokens": 1, "ignore_eos": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/completions",
            data=orjson.dumps(body),
            headers={"content-type": "application/json"},
        ) as response,
    ):
        assert response.status == 200, await response.text()


async def served_requests(server: vllm.VllmServer) -> float:
    """The server's own count of requests it finished (`vllm:request_success_total`)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + "/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


async def answered_by(gateway: Gateway, prompt: str) -> vllm.VllmServer:
    """Send `prompt` through Envoy; the server whose finished-request count went up (polled:
    vLLM may count a request just after answering it)."""
    before = [await served_requests(s) for s in gateway.servers]
    await complete(gateway.envoy.url, prompt)
    deadline = time.monotonic() + 10
    while True:
        after = [await served_requests(s) for s in gateway.servers]
        risen = [s for s, b, a in zip(gateway.servers, before, after, strict=True) if a > b]
        if risen:
            (server,) = risen
            return server
        assert time.monotonic() < deadline, "no server counted the request"
        await asyncio.sleep(0.05)


async def test_a_long_prompt_goes_where_vllm_cached_it_and_not_after_eviction(
    gateway: Gateway,
) -> None:
    tokenizer = tokenizing.load(vllm.MODEL)
    prefix = words("shared-prefix", 400)
    tokens = list(tokenizer.encode_text(prefix))
    async with aiohttp.ClientSession() as session:
        body = {"model": vllm.MODEL_NAME, "prompt": prefix}
        async with session.post(gateway.servers[0].url + "/tokenize", json=body) as response:
            assert (await response.json())["tokens"] == tokens  # the picker tokenizes alike
    full = len(tokens) // BLOCK
    assert full >= 10

    first = await answered_by(gateway, prefix + " first question")
    (other,) = [s for s in gateway.servers if s is not first]
    await wait_for(
        lambda: gateway.held_blocks(first, tokens) == full,
        timeout_s=10,
        what=f"{first.target}'s BlockStored events in the picker's index",
    )
    assert gateway.held_blocks(other, tokens) == 0
    for i in range(4):
        assert await answered_by(gateway, prefix + f" question {i}") is first

    # The holder evicts the prefix: long prompts of other words, sent to it directly, fill
    # its 128-block cache; vLLM's BlockRemoved events reach the index.
    for i in range(12):
        if gateway.held_blocks(first, tokens) == 0:
            break
        await complete(first.url, words(f"filler-{i}", 600))
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: gateway.held_blocks(first, tokens) < full, timeout_s=2.0)
    await wait_for(
        lambda: gateway.held_blocks(first, tokens) == 0,
        timeout_s=10,
        what="BlockRemoved events for the evicted prefix",
    )

    # The other server caches it (served directly: the picker did not route it there).
    await complete(other.url, prefix + " elsewhere")
    await wait_for(
        lambda: gateway.held_blocks(other, tokens) == full,
        timeout_s=10,
        what=f"{other.target}'s BlockStored events",
    )
    for i in range(3):
        assert await answered_by(gateway, prefix + f" after {i}") is other
