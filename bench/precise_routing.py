"""Routing quality when the working set does not fit in the pool's KV cache: round-robin,
the approximate prefix index (default profile), the precise index fed by the servers' own
KV-cache events (the shipped precise-prefix config) and sglang-router's cache_aware policy,
same pool, same run.

Four simulated vLLM servers with small KV caches (600 blocks of 16 tokens: about nine of
the long contexts each, so the pool holds under half of them); 80 tenants, each with its
own context of about 1000 tokens (600 filler words in the tokenizer below) and a short
question, tenant popularity Zipf-skewed (exponent 1).
Under this pressure servers keep evicting: the approximate index cannot see that, the
precise one is told. The servers tokenize with the same tokenizer the precise picker is
given (`tests/support/tiny_tokenizer.py`), so the token ids in their events are the
picker's. Open-loop Poisson load at 50, 80 and 100% of the pool's capacity (measured
first, closed loop, Envoy least-request); every router gets the same warm-up pass (short
responses: it only fills the caches).

The shapes that decide whether knowing beats guessing, as options:

* `--max-tokens` (default 256): streamed responses of a few hundred tokens hold their
  decode blocks in the KV cache for seconds, evicting cached prefixes the approximate
  index still counts; 16 is the short-response shape of the first runs.
* `--replicas N`: N picker replicas, each with its own Envoy as the chart runs them,
  clients spread over them at random (N independent Poisson streams of rate/N: what a
  Service's random spreading of a Poisson stream gives); each approximate index learns
  only from the requests its replica routed; every precise replica subscribes to every
  server (servers bind their publishers on their own loopback address, pickers connect).
* `--max-num-seqs N` (default 4, as SIM_ARGS): with 16 the batch is bounded by the KV
  cache, as on a GPU server with vLLM's default cap (256), not by a small sequence cap:
  running sequences' decode blocks then compete with cached prefixes for the cache.
* router `approximate-unsized`: the default profile with `autoTune: false`, i.e. a server
  that does not report its KV-cache size (no `vllm:cache_config_info`, e.g. SGLang), so
  the approximate LRU has its default capacity (31,250 blocks per server).
* router `precise-no-in-flight`: the shipped precise config with `inFlightPrefixes: false`
  (the index learns from events only, as before that parameter existed).

Reported per router and load: TTFT p50/p90 seen by the client and the servers' own
prefix-cache hit rate (`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`
over the run, in tokens, summed over the pool); the precise pickers' event counters.

sglang-router is a separate install (`scripts/setup test,compare`); without it that
column is skipped with a note.

    .venv/bin/python -m bench.precise_routing --quick                 # ~20 minutes
    .venv/bin/python -m bench.precise_routing --quick --max-tokens 16 --routers approximate,precise
    .venv/bin/python -m bench.precise_routing --quick --replicas 2 --routers approximate,precise
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path

import aiohttp
import yaml

from bench.harness import direct_envoy, picker, simulators
from bench.skewed_prefix import sglang_router, sglang_router_binary
from epp.datalayer import prometheus_text
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port, free_tcp_port_on
from sluice.loadgen import plots, runner, summary, workloads
from tests.support import tiny_tokenizer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS = HERE.parent / "docs" / "configs"
MODEL = "sim-model"
SERVERS = 4
SHORT_RESPONSE = 16  # tokens: the first runs' shape, and the warm-up's
LONG_RESPONSE = 256  # tokens: the default of --max-tokens
SIM_ARGS = [
    "--model", MODEL,
    "--max-num-seqs", "4",
    "--time-to-first-token", "20",
    "--prefill-time-per-token", "0.5",
    "--inter-token-latency", "20",
    "--block-size", "16",
]  # fmt: skip
KV_BLOCKS = 600  # per server: about nine of the long contexts, so the pool holds ~36 of 80
ROUTERS = (
    "round-robin",
    "approximate",
    "approximate-unsized",
    "precise",
    "precise-no-in-flight",
    "sglang-router",
)


def workload(seed: int, max_tokens: int = SHORT_RESPONSE) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind="shared-prefix", model=MODEL, groups=80, prefix_tokens=600, question_tokens=40,
        max_tokens=max_tokens, prefix_skew=1.0, seed=seed,
    )  # fmt: skip


def precise_config(
    tokenizer_dir: Path,
    collector: str | None,
    into: Path,
    model: str = MODEL,
    *,
    connect_port: int | None = None,
    in_flight: bool = True,
) -> Path:
    """docs/configs/precise-prefix.yaml with the servers' tokenizer for `model`, every
    weight as shipped. Events: a `collector` socket the servers connect to, or (with
    `connect_port`, `collector` None) a subscription to each server at that port."""
    config = yaml.safe_load((CONFIGS / "precise-prefix.yaml").read_text())
    for plugin in config["plugins"]:
        if plugin["type"] == "kv-events-data-source":
            if connect_port is not None:
                plugin["parameters"] = {"mode": "connect", "port": connect_port}
            else:
                plugin["parameters"] = {"mode": "bind", "bindAddress": collector}
        elif plugin["type"] == "precise-prefix-cache-producer":
            plugin["parameters"]["tokenizers"] = {model: str(tokenizer_dir)}
            if not in_flight:
                plugin["parameters"]["inFlightPrefixes"] = False
    into.write_text(yaml.safe_dump(config))
    return into


def unsized_approximate_config(into: Path) -> Path:
    """The default profile (same scorers and weights) with an approximate index that is
    not told the servers' KV-cache size, as for servers without `vllm:cache_config_info`."""
    into.write_text(
        """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: approx-prefix-cache-producer, parameters: {autoTune: false}}
- {type: prefix-cache-scorer}
- {type: queue-scorer}
- {type: kv-cache-utilization-scorer}
- {type: max-score-picker}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
"""
    )
    return into


async def metrics_page(session: aiohttp.ClientSession, url: str) -> prometheus_text.MetricsPage:
    async with session.get(url) as response:
        response.raise_for_status()
        return prometheus_text.MetricsPage(await response.text())


async def server_prefix_counters(backends: Sequence[str]) -> tuple[float, float]:
    """(hits, queries) in tokens, summed over the servers' own /metrics."""
    hits = queries = 0.0
    async with aiohttp.ClientSession() as session:
        for backend in backends:
            page = await metrics_page(session, f"http://{backend}/metrics")
            hits += sum(s.value for s in page.samples("vllm:prefix_cache_hits_total"))
            queries += sum(s.value for s in page.samples("vllm:prefix_cache_queries_total"))
    return hits, queries


PRECISE_COUNTERS = (
    "inference_extension_kv_events_total",
    "inference_extension_kv_event_index_resets_total",
    "inference_extension_precise_prefix_approximate_total",
)


async def precise_picker_counters(urls: str | Sequence[str]) -> dict[str, float]:
    """Event, index-reset and approximate-fallback counters of the precise picker(s), per
    series (name and labels, e.g. the event outcome), summed over the pickers."""
    counters: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        for url in [urls] if isinstance(urls, str) else urls:
            page = await metrics_page(session, url)
            for name in PRECISE_COUNTERS:
                for sample in page.samples(name):
                    labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                    series = f"{name}{{{labels}}}" if labels else name
                    counters[series] = counters.get(series, 0.0) + sample.value
    return counters


async def measure(
    url: str,
    requests: int,
    rate: float | None,
    seed: int,
    concurrency: int = 64,
    max_tokens: int = SHORT_RESPONSE,
) -> list[runner.RequestResult]:
    plan = runner.LoadPlan(
        url=url, requests=requests, rate=rate, concurrency=concurrency, seed=seed
    )
    return await runner.run_load(plan, workloads.generate(workload(seed, max_tokens)))


def _hosts(count: int) -> list[str]:
    """A loopback address per server, so each binds its KV-event publisher on the same
    port of its own address, as pods do, and pickers subscribe per server."""
    return [f"127.0.0.{10 + i}" for i in range(count)]


async def measure_spread(
    urls: Sequence[str],
    requests: int,
    rate: float | None,
    seed: int,
    concurrency: int = 64,
    max_tokens: int = SHORT_RESPONSE,
) -> list[runner.RequestResult]:
    """`measure` through several gateways (one per picker replica), clients spread over
    them: one stream each, with its share of the requests, rate and concurrency."""
    if len(urls) == 1:
        return await measure(urls[0], requests, rate, seed, concurrency, max_tokens)
    n = len(urls)
    shares = await asyncio.gather(
        *(
            measure(
                url,
                requests // n + (i < requests % n),
                rate / n if rate else None,
                seed * 1000 + i,
                max(1, concurrency // n),
                max_tokens,
            )
            for i, url in enumerate(urls)
        )
    )
    return [result for share in shares for result in share]


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    loads = args.loads
    hosts = _hosts(SERVERS)
    events_port = free_tcp_port_on(hosts)
    tokenizer_dir = tiny_tokenizer.write(workdir / "tokenizer")
    out: dict[str, object] = {
        "loads": loads,
        "sim_args": SIM_ARGS,
        "workload": asdict(workload(0, args.max_tokens)),
        "replicas": args.replicas,
        "max_num_seqs": args.max_num_seqs,
        "kv_blocks": args.kv_blocks,
        "routers": args.routers,
    }
    async with AsyncExitStack() as stack:
        backends: list[str] = []
        for i, host in enumerate(hosts):
            events = json.dumps(
                {"enable_kv_cache_events": True, "endpoint": f"tcp://{host}:{events_port}",
                 "bind": True}
            )  # fmt: skip
            sim_args = [
                *SIM_ARGS, "--max-num-seqs", str(args.max_num_seqs), "--pod-name-prefix", f"sim{i}",
                "--kv-cache-size", str(args.kv_blocks),
                "--tokenizer", str(tokenizer_dir), "--kv-events-config", events,
            ]  # fmt: skip
            backends += await stack.enter_async_context(simulators(1, sim_args, host))
        urls: dict[str, list[str]] = {}
        direct = {"least-request": gateway_settings.LbPolicy.LEAST_REQUEST}
        if "round-robin" in args.routers:
            direct["round-robin"] = gateway_settings.LbPolicy.ROUND_ROBIN
        for name, policy in direct.items():
            urls[name] = [await stack.enter_async_context(direct_envoy(backends, policy))]
        configs: dict[str, list[str]] = {
            "approximate": [],
            "approximate-unsized": [
                "--config-file", str(unsized_approximate_config(workdir / "unsized.yaml"))
            ],
        }  # fmt: skip
        for name, in_flight in (("precise", True), ("precise-no-in-flight", False)):
            path = precise_config(
                tokenizer_dir, None, workdir / f"{name}.yaml",
                connect_port=events_port, in_flight=in_flight,
            )  # fmt: skip
            configs[name] = ["--config-file", str(path)]
        # The precise pickers' own metrics show that events arrived and nothing fell back
        # to their approximate index.
        precise_metrics: dict[str, list[str]] = {}
        for name in [r for r in args.routers if r in configs]:
            for _ in range(args.replicas):
                metrics_port = free_tcp_port()
                started = picker(backends, configs[name], metrics_port)
                _, port = await stack.enter_async_context(started)
                options = gateway_settings.GatewayOptions(picker_port=port)
                envoy = await stack.enter_async_context(EnvoyProcess(options))
                urls.setdefault(name, []).append(envoy.url)
                if name.startswith("precise"):
                    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                    precise_metrics.setdefault(name, []).append(metrics_url)
        if "sglang-router" in args.routers:
            if sglang_router_binary():
                urls["sglang-router"] = [await stack.enter_async_context(sglang_router(backends))]
            else:
                print("sglang-router not installed (scripts/setup test,compare): skipped")
        capacity = args.capacity or summary.summarise(
            await measure(
                urls["least-request"][0], args.calibration_requests, None, seed=99,
                max_tokens=args.max_tokens,
            )
        ).throughput_rps  # fmt: skip
        out["capacity_rps"] = capacity
        print(f"pool capacity (closed loop, least-request): {capacity:.2f} req/s", flush=True)
        # The reference is cache-oblivious; a cache-aware router serves more. How much more
        # says how loaded it really is at "80%".
        capacity_of: dict[str, float] = {}
        for name in args.capacity_of:
            capacity_of[name] = summary.summarise(
                await measure_spread(
                    urls[name], args.calibration_requests, None, seed=98,
                    max_tokens=args.max_tokens,
                )
            ).throughput_rps  # fmt: skip
            print(f"{name} capacity (closed loop): {capacity_of[name]:.2f} req/s", flush=True)
        out["capacity_of"] = capacity_of
        del urls["least-request"]  # the calibration reference, not a contender here
        series: dict[str, list[tuple[float, summary.Summary]]] = {name: [] for name in urls}
        server_hits: dict[str, dict[float, float]] = {name: {} for name in urls}
        rows = []
        breakdown: dict[str, dict[float, dict[str, float]]] = {}
        for name, url in urls.items():
            await measure_spread(url, args.warmup_requests, None, seed=7, concurrency=8)
            for load in loads:
                rate = capacity * load
                requests = max(args.min_requests, int(rate * args.seconds))
                hits_before, queries_before = await server_prefix_counters(backends)
                results = await measure_spread(
                    url, requests, rate, seed=int(load * 100), max_tokens=args.max_tokens
                )
                hits_after, queries_after = await server_prefix_counters(backends)
                queried = queries_after - queries_before
                server_hits[name][load] = (hits_after - hits_before) / queried if queried else 0.0
                runner.write_jsonl(
                    results, RESULTS / f"precise_{args.tag}{name}_{int(load * 100)}.jsonl"
                )
                s = summary.summarise(results)
                series[name].append((load, s))
                rows.append((f"{name} @ {load:.0%}", s))
                split = breakdown.setdefault(name, {})[load] = by_cache_hit(results)
                print(
                    summary.table([rows[-1]]).splitlines()[-1],
                    f"server prefix hit {server_hits[name][load]:.0%};",
                    f"half-cached {split['hit_share']:.0%}: TTFT p50/p90 "
                    f"{split['hit_ttft_p50_s'] * 1000:.0f}/{split['hit_ttft_p90_s'] * 1000:.0f} ms,"
                    f" others {split['miss_ttft_p50_s'] * 1000:.0f}/"
                    f"{split['miss_ttft_p90_s'] * 1000:.0f} ms",
                    flush=True,
                )
        out["runs"] = {
            name: [
                {
                    "load": load,
                    "server_prefix_hit_rate": server_hits[name][load],
                    **breakdown[name][load],
                    **asdict(s),
                }
                for load, s in points
            ]
            for name, points in series.items()
        }
        out["table"] = quality_table(series, server_hits)
        print(summary.table(rows))
        print(out["table"])
        if 0.8 in loads and "approximate" in series:
            at_80 = {name: dict(points)[0.8] for name, points in series.items()}
            approximate = at_80["approximate"].ttft_p90_s
            for name, s in at_80.items():
                print(
                    f"at 80%: {name} TTFT p90 {s.ttft_p90_s * 1000:.0f} ms (approximate / it = "
                    f"{approximate / s.ttft_p90_s:.2f}x), server prefix hit "
                    f"{server_hits[name][0.8]:.0%}"
                )
        counters = {name: await precise_picker_counters(u) for name, u in precise_metrics.items()}
        out["precise_pickers"] = counters
        for name, found in counters.items():
            print(f"{name} picker(s):", found)
        try:
            plots.plot_comparison(
                series, RESULTS / f"precise_routing{args.tag}.png",
                f"{workload(0).groups} tenants, working set > KV cache, {SERVERS} servers, "
                f"{args.max_tokens}-token responses, {args.replicas} picker replica(s), "
                f"max {args.max_num_seqs} sequences, {args.kv_blocks} KV blocks per server",
            )  # fmt: skip
        except RuntimeError as error:
            print(f"no plot: {error}")
    return out


def by_cache_hit(results: Sequence[runner.RequestResult]) -> dict[str, float]:
    """Where the TTFT tail comes from: the share of requests that found at least half their
    prompt cached on the server they were sent to, and TTFT p50/p90 of those (the rest
    wait for a slot, not for a prefill) and of the others (a prefill of most of the
    prompt)."""
    done = [(r.ttft_s, r) for r in results if r.ttft_s is not None and r.prompt_tokens]
    hits = sorted(t for t, r in done if r.cached_tokens * 2 >= r.prompt_tokens)
    misses = sorted(t for t, r in done if r.cached_tokens * 2 < r.prompt_tokens)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    return {
        "hit_share": len(hits) / len(done) if done else 0.0,
        "hit_ttft_p50_s": pct(hits, 0.5),
        "hit_ttft_p90_s": pct(hits, 0.9),
        "miss_ttft_p50_s": pct(misses, 0.5),
        "miss_ttft_p90_s": pct(misses, 0.9),
    }


def quality_table(
    series: dict[str, list[tuple[float, summary.Summary]]],
    server_hits: dict[str, dict[float, float]],
) -> str:
    lines = [
        "| router | load | req/s | TTFT p50 ms | TTFT p90 ms | server prefix hit |",
        "|" + "---|" * 6,
    ]
    for name, points in series.items():
        for load, s in points:
            lines.append(
                f"| {name} | {load:.0%} | {s.throughput_rps:.1f} | {s.ttft_p50_s * 1000:.0f} "
                f"| {s.ttft_p90_s * 1000:.0f} | {server_hits[name][load]:.0%} |"
            )
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown router {unknown[0]!r}; known: {ROUTERS}")
    return names


def _loads(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="per load level and router")
    parser.add_argument("--min-requests", type=int, default=50, help="per load level and router")
    parser.add_argument("--calibration-requests", type=int, default=500)
    parser.add_argument("--capacity", type=float, default=0.0,
                        help="req/s to take as 100%% instead of measuring it")  # fmt: skip
    parser.add_argument("--warmup-requests", type=int, default=200)
    parser.add_argument(
        "--capacity-of",
        type=_names,
        default=[],
        help="routers whose own closed-loop capacity is measured too (reported, not used)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=LONG_RESPONSE,
        help="tokens per response (default %(default)s; 16: the short shape)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=4,
        help="sequences a server runs at once (default %(default)s)",
    )
    parser.add_argument(
        "--kv-blocks",
        type=int,
        default=KV_BLOCKS,
        help="KV blocks of 16 tokens per server (default %(default)s: the pool holds ~36 of "
        "the 80 contexts; 1200: ~72 of 80)",
    )
    parser.add_argument("--replicas", type=int, default=1, help="picker replicas per router")
    parser.add_argument(
        "--routers",
        type=_names,
        default=list(ROUTERS),
        help="comma-separated, of: " + ", ".join(ROUTERS),
    )
    parser.add_argument(
        "--loads",
        type=_loads,
        default=[0.5, 0.8, 1.0],
        help="shares of capacity (default 0.5,0.8,1.0)",
    )
    parser.add_argument("--tag", default="", help="prefix of the result files' names")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()  # fmt: skip
    if args.replicas < 1 or args.max_tokens < 1:
        parser.error("--replicas and --max-tokens must be at least 1")
    if args.quick:
        args.seconds, args.calibration_requests = 15.0, 250
    with tempfile.TemporaryDirectory(prefix="precise-routing-") as workdir:
        results = asyncio.run(run(args, Path(workdir)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"precise_routing{args.tag}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
