"""Two picker replicas behind one Envoy: what routing by replicas that do not share state
costs, approximate against precise prefix index.

Two `sluice picker` processes in one Envoy's ext_proc cluster (round robin per request),
in front of simulated vLLM servers, each in its own process on its own loopback address
with a small KV cache, publishing its KV-cache events on a bound socket. Precise replicas
(the shipped `docs/configs/precise-prefix.yaml`, the simulators' tokenizer) each connect to
every server's publisher; approximate replicas (the default profile) learn only from what
they routed themselves. The benchmark subscribes to every server's events too, as a third
subscriber, and so knows what each server holds when a request is sent.

A shared-prefix workload (tenants with long contexts, Zipf popularity, a fresh question on
each) is sent one request at a time at `--rate`. Per request: the server that answered
(`x-inference-pod`), the replica that routed it (the one whose own request counter,
`inference_objective_request_total`, moved) and how many of the prompt's leading blocks
each server held just before. Reported:

* wrong choice: the request went to a server holding fewer of its prompt's blocks than the
  best server did, over all requests and among prompts some server held blocks of;
* the servers' own prefix-cache hit rate (tokens) over the run;
* handovers: consecutive requests of a tenant routed by *different* replicas while the
  server that answered the first was still the only best holder: the share that went to
  it again (replicas agreeing); the same for consecutive requests routed by the *same*
  replica, as the control.

    flock /tmp/sluice-bench.lock .venv/bin/python -m bench.replicas
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import orjson
import yaml
import zmq

from bench.harness import simulators
from bench.precise_routing import server_prefix_counters
from epp.bodies import tokenizer as tokenizing
from epp.datalayer import kv_block_index, kv_events
from epp.datastore.snapshot import EndpointKey
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port_on
from tests.support import tiny_tokenizer
from tests.support.picker_process import PickerProcess, picker_process

BLOCK = 16
MODEL = "tiny"
HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
REQUESTS = "inference_objective_request_total"  # each replica's own: who routed what
KV_EVENTS = "inference_extension_kv_events_total"


@dataclass(frozen=True, slots=True)
class Outcome:
    index: str
    seed: int
    requests: int
    seconds: float
    routed: tuple[int, int]  # requests each replica routed
    wrong: int  # sent to a server holding fewer of the prompt's blocks than the best one
    cached: int  # some server held blocks of the prompt
    cached_wrong: int
    server_prefix_hit_rate: float
    handovers: int  # consecutive requests of a tenant, other replica, holder unchanged
    handovers_followed: int  # ...that went to the holder
    same_replica: int  # the same, routed by the same replica (control)
    same_replica_followed: int
    truth_gaps: int  # event messages the benchmark's own subscription missed (should be 0)

    @property
    def wrong_share(self) -> float:
        return self.wrong / self.requests

    @property
    def cached_wrong_share(self) -> float:
        return self.cached_wrong / max(self.cached, 1)


class ServerCaches:
    """What each server holds, from its own KV events (the benchmark's subscription)."""

    def __init__(self, publishers: dict[str, str]) -> None:
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sockets: dict[str, zmq.Socket[bytes]] = {}
        for server, address in publishers.items():
            subscriber = self._context.socket(zmq.SUB)
            subscriber.setsockopt(zmq.SUBSCRIBE, b"")
            subscriber.setsockopt(zmq.RCVHWM, 1_000_000)
            subscriber.connect(address)
            self._sockets[server] = subscriber
        self.index = kv_block_index.KvBlockIndex()
        self._sequences: dict[str, int] = {}
        self.gaps = 0

    def drain(self) -> set[str]:
        """Apply every message that arrived; the servers that sent any."""
        heard = set()
        for server, subscriber in self._sockets.items():
            while True:
                try:
                    frames = subscriber.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                heard.add(server)
                batch = kv_events.decode(frames)
                last = self._sequences.get(server)
                if last is not None and batch.sequence != last + 1:
                    self.gaps += 1
                self._sequences[server] = batch.sequence
                for event in batch.events:
                    self.index.apply(EndpointKey(server), event, capacity=1 << 20)
        return heard

    def held(self, keys: Sequence[int]) -> dict[str, int]:
        """Leading blocks of the prompt (its block keys) each server holds."""
        held = {}
        for server in self._sockets:
            pod = self.index.pod(EndpointKey(server))
            held[server] = 0 if pod is None else pod.matched(keys)
        return held

    def close(self) -> None:
        for subscriber in self._sockets.values():
            subscriber.close(linger=0)
        self._context.term()


def precise_config(tok_dir: Path, events_port: int, into: Path) -> Path:
    """docs/configs/precise-prefix.yaml with the simulators' tokenizer, subscribing to
    every server's publisher at `events_port` (connect mode, as shipped)."""
    config = yaml.safe_load((DOCS / "configs" / "precise-prefix.yaml").read_text())
    for plugin in config["plugins"]:
        if plugin["type"] == "kv-events-data-source":
            plugin["parameters"] = {"mode": "connect", "port": events_port}
        elif plugin["type"] == "precise-prefix-cache-producer":
            plugin["parameters"]["tokenizers"] = {MODEL: str(tok_dir)}
    into.write_text(yaml.safe_dump(config))
    return into


@dataclass(frozen=True, slots=True)
class Pool:
    envoy: EnvoyProcess
    replicas: tuple[PickerProcess, ...]
    pods: dict[str, str]  # pod name -> ip:port
    caches: ServerCaches
    session: aiohttp.ClientSession


@contextlib.asynccontextmanager
async def pool(
    index: str, args: argparse.Namespace, tok_dir: Path, workdir: Path
) -> AsyncIterator[Pool]:
    """Fresh servers, two replicas with `index`'s config, one Envoy in front of both."""
    hosts = [f"127.0.0.{10 + i}" for i in range(args.servers)]
    events_port = free_tcp_port_on(hosts)
    sim_args = [
        "--model", MODEL, "--tokenizer", str(tok_dir),
        "--kv-cache-size", str(args.kv_blocks), "--block-size", str(BLOCK),
        "--time-to-first-token", "1", "--prefill-time-per-token", "0",
        "--inter-token-latency", "1", "--default-max-tokens", "1",
    ]  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        pods, publishers = {}, {}
        for i, host in enumerate(hosts):
            publisher = f"tcp://{host}:{events_port}"
            events = {"enable_kv_cache_events": True, "endpoint": publisher, "bind": True}
            own = ["--pod-name-prefix", f"sim{i}", "--kv-events-config", json.dumps(events)]
            [address] = await stack.enter_async_context(simulators(1, [*sim_args, *own], host=host))
            pods[f"sim{i}-0"] = address
            publishers[address] = publisher
        caches = ServerCaches(publishers)
        stack.callback(caches.close)
        config = None
        if index == "precise":
            config = precise_config(tok_dir, events_port, workdir / "precise-prefix.yaml")
        backends = list(pods.values())
        replicas = tuple(
            [await stack.enter_async_context(picker_process(backends, config)) for _ in range(2)]
        )
        options = gateway_settings.GatewayOptions(
            picker_endpoints=tuple(("127.0.0.1", r.grpc_port) for r in replicas)
        )
        envoy = await stack.enter_async_context(EnvoyProcess(options))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield Pool(envoy, replicas, pods, caches, session)


async def _complete(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    """POST a completion; the pod that answered."""
    body = orjson.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1})
    async with session.post(
        url + "/v1/completions", data=body, headers={"content-type": "application/json"}
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        return response.headers["x-inference-pod"]


async def _counters(pool: Pool, name: str, **labels: str) -> list[float]:
    return [await r.counter(pool.session, name, **labels) for r in pool.replicas]


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Poll `condition` (other processes signal nothing) for up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.02)
    return False


async def subscribed(pool: Pool, precise: bool) -> None:
    """Warm-up prompts served on each server directly until its events reach the benchmark
    (and, precise, both replicas: ZMQ drops what is published before a subscription is
    up); then every server's cache is reset, so the run starts empty for everyone."""
    for pod, address in pool.pods.items():
        for attempt in range(50):
            before = await _counters(pool, KV_EVENTS, outcome=kv_block_index.STORED)
            pool.caches.drain()
            await _complete(pool.session, f"http://{address}", f"warm-up {attempt} " * 30)

            seen: set[str] = set()

            async def heard(
                before: list[float] = before, address: str = address, seen: set[str] = seen
            ) -> bool:
                seen |= pool.caches.drain()
                if address not in seen:
                    return False
                now = await _counters(pool, KV_EVENTS, outcome=kv_block_index.STORED)
                return not precise or all(n > b for n, b in zip(now, before, strict=True))

            if await _until(heard, timeout_s=1.0):
                break
        else:
            raise RuntimeError(f"{pod}'s KV events never reached every subscriber")
    for address in pool.pods.values():
        async with pool.session.post(f"http://{address}/reset_prefix_cache") as response:
            response.raise_for_status()

    async def cleared() -> bool:
        pool.caches.drain()
        if pool.caches.index.blocks():
            return False
        now = await _counters(pool, KV_EVENTS, outcome=kv_block_index.CLEARED)
        return not precise or all(n >= len(pool.pods) for n in now)

    if not await _until(cleared, timeout_s=10):
        raise RuntimeError("the servers' cache resets did not reach every subscriber")


async def run(index: str, args: argparse.Namespace, seed: int, tok_dir: Path) -> Outcome:
    """A fresh pool with `index`'s replicas; the workload through its Envoy."""
    text = "".join((DOCS / name).read_text() for name in ("configuration.md", "data-layer.md"))
    if len(text) < args.tenants * 1500:
        raise SystemExit(f"--tenants {args.tenants}: the docs hold at most {len(text) // 1500}")
    rng = random.Random(seed)
    contexts = [text[i * 1500 : i * 1500 + args.context_chars] for i in range(args.tenants)]
    weights = [1 / (rank + 1) ** args.zipf for rank in range(args.tenants)]
    tokenizer = tokenizing.load(tok_dir)
    with tempfile.TemporaryDirectory(prefix="replicas-") as workdir:
        async with pool(index, args, tok_dir, Path(workdir)) as p:
            await subscribed(p, precise=index == "precise")
            backends = list(p.pods.values())
            hits_before, queries_before = await server_prefix_counters(backends)
            routed = [0, 0]
            wrong = cached = cached_wrong = 0
            handovers = followed = same = same_followed = 0
            last: dict[int, tuple[int, str]] = {}  # tenant -> (replica, server) of its last
            counts = await _counters(p, REQUESTS)
            start = time.monotonic()
            for n in range(args.requests):
                await asyncio.sleep(max(0.0, start + n / args.rate - time.monotonic()))
                tenant = rng.choices(range(args.tenants), weights)[0]
                prompt = f"{contexts[tenant]} Question {n}: {rng.random():.6f}?"
                keys = kv_block_index.chain_keys(tokenizer.encode_text(prompt), BLOCK)
                p.caches.drain()
                held = p.caches.held(keys)
                server = p.pods[await _complete(p.session, p.envoy.url, prompt)]
                now = await _counters(p, REQUESTS)
                moved = [i for i in range(2) if now[i] != counts[i]]
                if len(moved) != 1 or now[moved[0]] != counts[moved[0]] + 1:
                    raise RuntimeError(f"request {n}: replica counters {counts} -> {now}")
                replica, counts = moved[0], now
                routed[replica] += 1
                best = max(held.values())
                wrong += held[server] < best
                if best:
                    cached += 1
                    cached_wrong += held[server] < best
                if tenant in last:
                    before_replica, before_server = last[tenant]
                    only_holder = [s for s, h in held.items() if h == best and best] == [
                        before_server
                    ]
                    if only_holder and replica != before_replica:
                        handovers += 1
                        followed += server == before_server
                    elif only_holder:
                        same += 1
                        same_followed += server == before_server
                last[tenant] = (replica, server)
            seconds = time.monotonic() - start
            hits_after, queries_after = await server_prefix_counters(backends)
            queried = queries_after - queries_before
            return Outcome(
                index=index,
                seed=seed,
                requests=args.requests,
                seconds=seconds,
                routed=(routed[0], routed[1]),
                wrong=wrong,
                cached=cached,
                cached_wrong=cached_wrong,
                server_prefix_hit_rate=(hits_after - hits_before) / queried if queried else 0.0,
                handovers=handovers,
                handovers_followed=followed,
                same_replica=same,
                same_replica_followed=same_followed,
                truth_gaps=p.caches.gaps,
            )


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%} of {whole}" if whole else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=64, help="KV cache per server")
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--context-chars", type=int, default=1200, help="~16 blocks")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--runs", type=int, default=1, help="of each index, seeds 1, 2, ...")
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    args = parser.parse_args()
    for name, value in (("--servers", args.servers), ("--requests", args.requests)):
        if value < 2:
            parser.error(f"{name} must be at least 2, got {value}")
    if args.servers > 200 or args.rate <= 0 or args.runs < 1:
        parser.error("--servers at most 200, --rate positive, --runs at least 1")

    async def every() -> list[Outcome]:
        with tempfile.TemporaryDirectory() as tmp:
            tok_dir = tiny_tokenizer.write(Path(tmp) / "tiny")
            outcomes = []
            for seed in range(1, args.runs + 1):
                for index in ("approximate", "precise"):
                    outcomes.append(await run(index, args, seed, tok_dir))
                    print(_row(outcomes[-1]), flush=True)
            return outcomes

    print(
        "index        seed  req/s  routed    wrong   wrong|cached       server-hit  "
        "handover->holder  same-replica->holder  truth-gaps"
    )
    outcomes = asyncio.run(every())
    if args.json is not None:
        rows = [{**asdict(o), "wrong_share": o.wrong_share} for o in outcomes]
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def _row(o: Outcome) -> str:
    return (
        f"{o.index:<12} {o.seed:>4} {o.requests / o.seconds:>6.1f}  "
        f"{o.routed[0]:>3}/{o.routed[1]:<4}"
        f" {o.wrong_share:>6.1%}  {_share(o.cached_wrong, o.cached):>14}  "
        f"{o.server_prefix_hit_rate:>9.1%}  {_share(o.handovers_followed, o.handovers):>16}  "
        f"{_share(o.same_replica_followed, o.same_replica):>20}  {o.truth_gaps:>10}"
    )


if __name__ == "__main__":
    main()
