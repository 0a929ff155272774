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
first, closed loop, Envoy least-request); every router gets the same warm-up pass.

Reported per router and load: TTFT p50/p90 seen by the client and the servers' own
prefix-cache hit rate (`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`
over the run, in tokens, summed over the pool).

sglang-router is a separate install (`scripts/setup test,compare`); without it that
column is skipped with a note.

    .venv/bin/python -m bench.precise_routing            # ~15 minutes
    .venv/bin/python -m bench.precise_routing --quick    # ~6 minutes, noisier
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

from bench.harness import picker, simulators
from bench.skewed_prefix import sglang_router, sglang_router_binary
from epp.datalayer import prometheus_text
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port
from sluice.loadgen import plots, runner, summary, workloads
from tests.support import tiny_tokenizer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS = HERE.parent / "docs" / "configs"
MODEL = "sim-model"
SERVERS = 4
SIM_ARGS = [
    "--model", MODEL,
    "--max-num-seqs", "4",
    "--time-to-first-token", "20",
    "--prefill-time-per-token", "0.5",
    "--inter-token-latency", "20",
    "--kv-cache-size", "600",
    "--block-size", "16",
]  # fmt: skip


def workload(seed: int) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind="shared-prefix", model=MODEL, groups=80, prefix_tokens=600, question_tokens=40,
        max_tokens=16, prefix_skew=1.0, seed=seed,
    )  # fmt: skip


def precise_config(tokenizer_dir: Path, collector: str, into: Path, model: str = MODEL) -> Path:
    """docs/configs/precise-prefix.yaml with the servers' tokenizer for `model` and a
    collector socket the servers connect to; every weight as shipped."""
    config = yaml.safe_load((CONFIGS / "precise-prefix.yaml").read_text())
    for plugin in config["plugins"]:
        if plugin["type"] == "kv-events-data-source":
            plugin["parameters"] = {"mode": "bind", "bindAddress": collector}
        elif plugin["type"] == "precise-prefix-cache-producer":
            plugin["parameters"]["tokenizers"] = {model: str(tokenizer_dir)}
    into.write_text(yaml.safe_dump(config))
    return into


async def _page(session: aiohttp.ClientSession, url: str) -> prometheus_text.MetricsPage:
    async with session.get(url) as response:
        return prometheus_text.MetricsPage(await response.text())


async def server_prefix_counters(backends: Sequence[str]) -> tuple[float, float]:
    """(hits, queries) in tokens, summed over the servers' own /metrics."""
    hits = queries = 0.0
    async with aiohttp.ClientSession() as session:
        for backend in backends:
            page = await _page(session, f"http://{backend}/metrics")
            hits += sum(s.value for s in page.samples("vllm:prefix_cache_hits_total"))
            queries += sum(s.value for s in page.samples("vllm:prefix_cache_queries_total"))
    return hits, queries


PRECISE_COUNTERS = (
    "inference_extension_kv_events_total",
    "inference_extension_kv_event_index_resets_total",
    "inference_extension_precise_prefix_approximate_total",
)


async def precise_picker_counters(url: str) -> dict[str, float]:
    """Event, index-reset and approximate-fallback counters of the precise picker, per
    series (name and labels, e.g. the event outcome)."""
    async with aiohttp.ClientSession() as session:
        page = await _page(session, url)
    counters: dict[str, float] = {}
    for name in PRECISE_COUNTERS:
        for sample in page.samples(name):
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            series = f"{name}{{{labels}}}" if labels else name
            counters[series] = counters.get(series, 0.0) + sample.value
    return counters


async def measure(
    url: str, requests: int, rate: float | None, seed: int, concurrency: int = 64
) -> list[runner.RequestResult]:
    plan = runner.LoadPlan(
        url=url, requests=requests, rate=rate, concurrency=concurrency, seed=seed
    )
    return await runner.run_load(plan, workloads.generate(workload(seed)))


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    loads = [0.5, 0.8, 1.0]
    collector = f"tcp://127.0.0.1:{free_tcp_port()}"
    tokenizer_dir = tiny_tokenizer.write(workdir / "tokenizer")
    events = json.dumps({"enable_kv_cache_events": True, "endpoint": collector})
    sim_args = [*SIM_ARGS, "--tokenizer", str(tokenizer_dir), "--kv-events-config", events]
    out: dict[str, object] = {"loads": loads, "sim_args": SIM_ARGS, "workload": asdict(workload(0))}
    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(SERVERS, sim_args))
        urls: dict[str, str] = {}
        direct = {
            "round-robin": gateway_settings.LbPolicy.ROUND_ROBIN,
            "least-request": gateway_settings.LbPolicy.LEAST_REQUEST,
        }
        for name, policy in direct.items():
            options = gateway_settings.GatewayOptions(
                mode=gateway_settings.GatewayMode.DIRECT, backends=tuple(backends), lb_policy=policy
            )
            urls[name] = (await stack.enter_async_context(EnvoyProcess(options))).url
        precise = precise_config(tokenizer_dir, collector, workdir / "precise-prefix.yaml")
        # The precise picker's own metrics show that events arrived and nothing fell back
        # to its approximate index.
        metrics_port = free_tcp_port()
        precise_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        pickers = {
            "approximate": picker(backends),
            "precise": picker(backends, ["--config-file", str(precise)], metrics_port),
        }
        for name, started in pickers.items():
            _, port = await stack.enter_async_context(started)
            options = gateway_settings.GatewayOptions(picker_port=port)
            urls[name] = (await stack.enter_async_context(EnvoyProcess(options))).url
        if sglang_router_binary():
            urls["sglang-router"] = await stack.enter_async_context(sglang_router(backends))
        else:
            print("sglang-router not installed (scripts/setup test,compare): skipped")
        capacity = summary.summarise(
            await measure(urls["least-request"], args.calibration_requests, None, seed=99)
        ).throughput_rps
        out["capacity_rps"] = capacity
        print(f"pool capacity (closed loop, least-request): {capacity:.1f} req/s", flush=True)
        del urls["least-request"]  # the calibration reference, not a contender here
        series: dict[str, list[tuple[float, summary.Summary]]] = {name: [] for name in urls}
        server_hits: dict[str, dict[float, float]] = {name: {} for name in urls}
        rows = []
        for name, url in urls.items():
            await measure(url, args.warmup_requests, None, seed=7, concurrency=8)
            for load in loads:
                rate = capacity * load
                requests = max(50, int(rate * args.seconds))
                hits_before, queries_before = await server_prefix_counters(backends)
                results = await measure(url, requests, rate, seed=int(load * 100))
                hits_after, queries_after = await server_prefix_counters(backends)
                queried = queries_after - queries_before
                server_hits[name][load] = (hits_after - hits_before) / queried if queried else 0.0
                runner.write_jsonl(results, RESULTS / f"precise_{name}_{int(load * 100)}.jsonl")
                s = summary.summarise(results)
                series[name].append((load, s))
                rows.append((f"{name} @ {load:.0%}", s))
                print(
                    summary.table([rows[-1]]).splitlines()[-1],
                    f"server prefix hit {server_hits[name][load]:.0%}",
                    flush=True,
                )
        out["runs"] = {
            name: [
                {"load": load, "server_prefix_hit_rate": server_hits[name][load], **asdict(s)}
                for load, s in points
            ]
            for name, points in series.items()
        }
        out["table"] = quality_table(series, server_hits)
        print(summary.table(rows))
        print(out["table"])
        at_80 = {name: dict(points)[0.8] for name, points in series.items()}
        approximate = at_80["approximate"].ttft_p90_s
        for name, s in at_80.items():
            print(
                f"at 80%: {name} TTFT p90 {s.ttft_p90_s * 1000:.0f} ms (approximate / it = "
                f"{approximate / s.ttft_p90_s:.2f}x), server prefix hit "
                f"{server_hits[name][0.8]:.0%}"
            )
        out["precise_picker"] = await precise_picker_counters(precise_metrics)
        print("precise picker:", out["precise_picker"])
        try:
            plots.plot_comparison(
                series, RESULTS / "precise_routing.png",
                f"{workload(0).groups} tenants, working set > KV cache, {SERVERS} servers",
            )  # fmt: skip
        except RuntimeError as error:
            print(f"no plot: {error}")
    return out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="per load level and router")
    parser.add_argument("--calibration-requests", type=int, default=500)
    parser.add_argument("--warmup-requests", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.calibration_requests = 15.0, 250
    with tempfile.TemporaryDirectory(prefix="precise-routing-") as workdir:
        results = asyncio.run(run(args, Path(workdir)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "precise_routing.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
