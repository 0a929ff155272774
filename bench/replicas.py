"""Two picker replicas: how often they would route the same request differently.

Two pickers, each behind its own Envoy, in front of the same simulated vLLM servers
(small KV caches, publishing their KV-cache events; each picker subscribes to every
server). A shared-prefix workload (tenants with long contexts, Zipf popularity, a fresh
question on each) is sent one request at a time at `--rate`, alternating between the two
gateways. Before each request both pickers are asked where they would send it (parsed
and scheduled as a real request, not routed: `tests.support.picker.would_choose`); a
request counts as a disagreement when they name different servers.

Run once with the approximate prefix index (each replica learns only from what it routed
itself) and once with the precise one (both learn from the servers' events). Ties are
broken at random, so a prompt cached nowhere is a coin toss for both. Beside the share of
all requests, two figures read the truth off the servers' events (both configs keep the
event index; only precise routes on it): the share among prompts some server holds blocks
of, and the "costly" share, where the two choices hold different numbers of the prompt's
blocks (a disagreement between equally good servers costs nothing).

    .venv/bin/python -m bench.replicas
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import orjson

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
from tests.support.picker import fresh_metrics, running_picker, would_choose

BLOCK = 16
DOCS = Path(__file__).resolve().parents[1] / "docs"

_SOURCES = """
data:
  sources:
  - {pluginRef: metrics-data-source, extractors: [{pluginRef: core-metrics-extractor}]}
  - {pluginRef: kv-events-data-source, extractors: [{pluginRef: kv-events-extractor}]}
"""


def _config(index: str, tok_dir: Path, events_port: int) -> str:
    head = f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{type: kv-events-data-source, parameters: {{mode: connect, port: {events_port}}}}}
- {{type: kv-events-extractor}}
- {{type: queue-scorer}}
"""
    if index == "precise":
        return (
            head
            + f"""\
- {{type: precise-prefix-cache-producer, parameters: {{tokenizers: {{tiny: '{tok_dir}'}}}}}}
- {{type: precise-prefix-cache-scorer}}
{_SOURCES}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: precise-prefix-cache-scorer, weight: 3}}
  - {{pluginRef: queue-scorer, weight: 1}}
"""
        )
    return (
        head
        + f"""\
- {{type: approx-prefix-cache-producer, parameters: {{blockSizeTokens: {BLOCK}}}}}
- {{type: prefix-cache-scorer}}
{_SOURCES}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: queue-scorer, weight: 1}}
"""
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    index: str
    requests: int
    disagreements: int
    # Per the servers' own events: some server held blocks of the prompt.
    cached_requests: int
    cached_disagreements: int
    # The two choices held different numbers of the prompt's blocks: the choice mattered.
    costly_disagreements: int

    @property
    def share(self) -> float:
        return self.disagreements / self.requests

    @property
    def cached_share(self) -> float:
        return self.cached_disagreements / max(self.cached_requests, 1)

    @property
    def costly_share(self) -> float:
        return self.costly_disagreements / self.requests


@contextlib.asynccontextmanager
async def _gateways(
    index: str, servers: list[SimulatedServer], tok_dir: Path, events_port: int
) -> AsyncIterator[list[tuple[EnvoyProcess, Picker]]]:
    async with contextlib.AsyncExitStack() as stack:
        found = []
        for _ in range(2):
            picker = await stack.enter_async_context(
                running_picker(
                    endpoints=",".join(s.address for s in servers),
                    config_text=_config(index, tok_dir, events_port),
                )
            )
            options = envoy_config.GatewayOptions(
                mode=envoy_config.GatewayMode.PICKER, picker_port=picker.grpc_port
            )
            envoy = await stack.enter_async_context(EnvoyProcess(options))
            await fresh_metrics(picker)
            found.append((envoy, picker))
        yield found


async def _complete(session: aiohttp.ClientSession, url: str, body: bytes) -> None:
    async with session.post(
        url + "/v1/completions", data=body, headers={"content-type": "application/json"}
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")


async def run(index: str, args: argparse.Namespace, tok_dir: Path) -> Outcome:
    """A fresh set of servers and two replicas; the workload through both."""
    text = "".join((DOCS / name).read_text() for name in ("configuration.md", "data-layer.md"))
    if len(text) < args.tenants * 1500:
        raise SystemExit(
            f"--tenants {args.tenants}: the docs hold contexts for at most "
            f"{len(text) // 1500} tenants"
        )
    rng = random.Random(args.seed)
    contexts = [text[i * 1500 : i * 1500 + args.context_chars] for i in range(args.tenants)]
    weights = [1 / (rank + 1) ** args.zipf for rank in range(args.tenants)]
    events_port = free_tcp_port("127.0.0.1")
    hosts = [f"127.0.0.{10 + i}" for i in range(args.servers)]
    perf = engine.PerformanceModel(
        block_size=BLOCK,
        kv_cache_blocks=args.kv_blocks,
        ttft_ms=1.0,
        prefill_ms_per_token=0.0,
        itl_ms=1.0,
    )
    servers = [
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
        for i, host in enumerate(hosts)
    ]
    disagreements = cached = cached_disagreements = costly = 0
    tokenizer = tokenizing.load(tok_dir)
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        gateways = await stack.enter_async_context(_gateways(index, servers, tok_dir, events_port))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        start = time.monotonic()
        for n in range(args.requests):
            await asyncio.sleep(max(0.0, start + n / args.rate - time.monotonic()))
            tenant = rng.choices(range(args.tenants), weights)[0]
            prompt = f"{contexts[tenant]} Question {n}: {rng.random():.6f}?"
            body = orjson.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1})
            choices = [await would_choose(picker, body) for _, picker in gateways]
            differ = choices[0] != choices[1]
            disagreements += differ
            # Both configs keep the event index (only precise routes on it): the truth.
            held = _held_blocks(gateways[0][1], tokenizer, prompt)
            if max(held.values()) > 0:
                cached += 1
                cached_disagreements += differ
            costly += held[choices[0]] != held[choices[1]]
            envoy, _ = gateways[n % 2]
            await _complete(session, envoy.url, body)
    return Outcome(index, args.requests, disagreements, cached, cached_disagreements, costly)


def _held_blocks(
    picker: Picker, tokenizer: tokenizing.ModelTokenizer, prompt: str
) -> dict[str, int]:
    """Leading blocks of `prompt` each server holds, by the servers' KV events."""
    extractor = picker.config.plugins["kv-events-extractor"]
    assert isinstance(extractor, KvEventsExtractor)
    keys = kv_block_index.chain_keys(tokenizer.encode_text(prompt), BLOCK)
    held = {}
    for endpoint in picker.reconciler.current.endpoints:
        pod = extractor.index.pod(endpoint.key)
        held[endpoint.target] = 0 if pod is None else pod.matched(keys)
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=64, help="KV cache per server")
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--context-chars", type=int, default=1200, help="~16 blocks")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=25.0, help="requests per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    args = parser.parse_args()
    for name, value in (("--servers", args.servers), ("--requests", args.requests)):
        if value < 2:
            parser.error(f"{name} must be at least 2, got {value}")
    if args.rate <= 0:
        parser.error(f"--rate must be positive, got {args.rate}")

    async def both() -> list[Outcome]:
        with tempfile.TemporaryDirectory() as tmp:
            tok_dir = tiny_tokenizer.write(Path(tmp) / "tiny")
            return [await run(index, args, tok_dir) for index in ("approximate", "precise")]

    outcomes = asyncio.run(both())
    print(
        f"{'index':<12} {'requests':>8} {'differ':>7} {'prefix cached: differ':>24} {'costly':>7}"
    )
    for o in outcomes:
        print(
            f"{o.index:<12} {o.requests:>8} {o.share:>7.1%} "
            f"{o.cached_share:>15.1%} of {o.cached_requests:<5} {o.costly_share:>7.1%}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")


if __name__ == "__main__":
    main()
