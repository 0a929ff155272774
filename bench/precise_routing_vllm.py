"""Routing quality on real vLLM when the working set does not fit in the pool's KV cache:
round-robin, the approximate prefix index (default profile), the precise index fed by the
servers' own KV-cache events (the shipped precise-prefix config) and sglang-router's
cache_aware policy, same two servers, same run. The simulator variant is
`bench/precise_routing.py`; this one shares its config, counters and table.

Two real vLLM servers (the tiny model `scripts/vllm-setup` builds, from
`tests/support/vllm.py`), each pinned to its own core, with small KV caches: the pool's
cache size is read off the servers' `vllm:cache_config_info` and the number of tenants
is chosen so that all tenants' contexts together are `--working-set` times that (2.5 by
default). Each tenant has its own context of about 1,600 tokens (the model's window is
2,048) and a short question; popularity is Zipf-skewed (exponent 1), so the hottest
contexts fit and the tail keeps evicting. Every request decodes exactly 4 tokens
(`ignore_eos`), so prefill dominates and a cache hit shows in TTFT. The precise picker
tokenizes with the model's own tokenizer, so its block keys are the servers'.

Open-loop Poisson load at 50, 80 and 100% of the pool's capacity (measured first, closed
loop, Envoy least-request). Before each router the servers' prefix caches are emptied
(`POST /reset_prefix_cache`, a vLLM development endpoint) so no router inherits another's
cache, then every router gets the same warm-up pass.

Reported per router and load: TTFT p50/p90 seen by the client and the servers' own
prefix-cache hit rate (`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`
over the run, in tokens, summed over the pool); to explain them, the share of requests
the busier server finished and the median TTFT of requests that found at least half their
prompt cached (a hit) and of the rest, and, first, the TTFT of a context on an idle server
cold and cached (what a hit can save at best). Starting real vLLM servers: hold the
bench lock.

    flock /tmp/sluice-bench.lock .venv/bin/python -m bench.precise_routing_vllm          # ~14 min
    flock /tmp/sluice-bench.lock .venv/bin/python -m bench.precise_routing_vllm --quick  # ~6 min
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from bench import harness
from bench.harness import picker
from bench.precise_routing import (
    metrics_page,
    precise_config,
    precise_picker_counters,
    server_prefix_counters,
)
from bench.skewed_prefix import sglang_router, sglang_router_binary
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port
from sluice.loadgen import runner, summary, workloads
from tests.support import vllm

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SERVERS = 2  # one per core of this machine
SETTINGS = vllm.VllmSettings(
    max_model_len=2048,  # both models' max_position_embeddings
    max_num_seqs=4,
    dev_mode=True,  # POST /reset_prefix_cache
    prompt_tokens_details=True,  # each request's cached tokens, for the hit/miss split
)
# The bench model (default) spends ~10x as long on a cold prompt as on a cached one; the
# tests' tiny model ~2.5x, too little to tell a router's hop from a hit (bench/README.md).
# Both get the same KV cache in tokens (768 blocks of 32 per server).
MODELS = {  # name -> (directory, KV bytes per token)
    "bench": (vllm.BENCH_MODEL, vllm.BENCH_KV_BYTES_PER_TOKEN),
    "tiny": (vllm.MODEL, vllm.KV_BYTES_PER_TOKEN),
}
KV_CACHE_TOKENS = 768 * 32
CONTEXT_WORDS = 1200  # about 1,600 tokens of the tiny model's tokenizer
QUESTION_WORDS = 30
MAX_TOKENS = 4
CLEARED = 'inference_extension_kv_events_total{outcome="AllBlocksCleared"}'


def workload(seed: int, tenants: int) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind="shared-prefix", model=vllm.MODEL_NAME, groups=tenants,
        prefix_tokens=CONTEXT_WORDS, question_tokens=QUESTION_WORDS, max_tokens=MAX_TOKENS,
        ignore_eos=True, prefix_skew=1.0, seed=seed,
    )  # fmt: skip


async def pool_cache_tokens(servers: Sequence[vllm.VllmServer]) -> tuple[int, int]:
    """(tokens the pool's KV caches hold, block size), from each server's own
    `vllm:cache_config_info` rather than from what was asked for."""
    tokens, sizes = 0, set()
    async with aiohttp.ClientSession() as session:
        for server in servers:
            page = await metrics_page(session, server.url + "/metrics")
            (info,) = page.samples("vllm:cache_config_info")
            block_size = int(info.labels["block_size"])
            tokens += int(info.labels["num_gpu_blocks"]) * block_size
            sizes.add(block_size)
    (block_size,) = sizes
    return tokens, block_size


async def prompt_tokens(server: vllm.VllmServer, spec: workloads.WorkloadSpec) -> int:
    """Tokens of one request of `spec` as the server counts them (`/tokenize`)."""
    request = next(workloads.generate(spec))
    prompt = json.loads(request.body)["prompt"]
    body = {"model": vllm.MODEL_NAME, "prompt": prompt}
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.url + "/tokenize", json=body) as response,
    ):
        response.raise_for_status()
        return int((await response.json())["count"])


async def reset_prefix_caches(servers: Sequence[vllm.VllmServer]) -> None:
    """Empties every server's prefix cache and has it publish that."""
    async with aiohttp.ClientSession() as session:
        for server in servers:
            async with session.post(server.url + "/reset_prefix_cache") as response:
                response.raise_for_status()
                answer = await response.json()
            # vLLM refuses while requests hold blocks; none are in flight here.
            if answer.get("success") is not True:
                raise RuntimeError(f"{server.target} did not reset its prefix cache: {answer}")
            # vLLM publishes the AllBlocksCleared with the events of its next engine step:
            # one short request makes that step (its one block is no tenant's).
            body = {"model": vllm.MODEL_NAME, "prompt": "reset " * 40, "max_tokens": 1}
            async with session.post(server.url + "/v1/completions", json=body) as response:
                response.raise_for_status()


async def wait_for_counter(url: str, series: str, at_least: float, timeout_s: float) -> float:
    """Polls the picker's /metrics (another process: nothing to await) until `series`
    reaches `at_least`; its value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = (await precise_picker_counters(url)).get(series, 0.0)
        if value >= at_least:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{series} = {value:g} after {timeout_s:g}s, expected >= {at_least:g}"
            )
        await asyncio.sleep(0.2)


async def measure(
    url: str, spec: workloads.WorkloadSpec, requests: int, rate: float | None, concurrency: int
) -> list[runner.RequestResult]:
    plan = runner.LoadPlan(
        url=url, requests=requests, rate=rate, concurrency=concurrency, seed=spec.seed
    )
    results = await runner.run_load(plan, workloads.generate(spec))
    failed = [r for r in results if not runner.succeeded(r)]
    if failed:
        print(
            f"  {len(failed)} of {len(results)} failed, e.g. {failed[0].error or failed[0].status}"
        )
    return results


def change(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def finished_per_server(servers: Sequence[vllm.VllmServer]) -> list[float]:
    """Each server's own count of finished requests (`vllm:request_success_total`)."""
    async with aiohttp.ClientSession() as session:
        pages = [await metrics_page(session, s.url + "/metrics") for s in servers]
    return [sum(s.value for s in page.samples("vllm:request_success_total")) for page in pages]


def busiest_share(before: Sequence[float], after: Sequence[float]) -> float:
    served = [a - b for a, b in zip(after, before, strict=True)]
    return max(served) / sum(served) if sum(served) else 0.0


def ttft_p50_by_hit(results: Sequence[runner.RequestResult]) -> tuple[float, float]:
    """Median TTFT of requests that found at least half their prompt cached, and of the
    rest (each request's own `cached_tokens`); NaN where there were none."""
    hit: list[float] = []
    missed: list[float] = []
    for r in results:
        if runner.succeeded(r) and r.ttft_s is not None and r.prompt_tokens:
            (hit if r.cached_tokens * 2 >= r.prompt_tokens else missed).append(r.ttft_s)
    return summary.percentile(hit, 0.5), summary.percentile(missed, 0.5)


async def what_a_hit_saves(
    server: vllm.VllmServer, spec: workloads.WorkloadSpec, prompts: int = 5
) -> tuple[float, float]:
    """Median TTFT on an idle server of a context seen for the first time, and of the same
    request again (all but its last partial block cached)."""
    cold: list[float] = []
    warm: list[float] = []
    async with aiohttp.ClientSession() as session:
        for request in itertools.islice(workloads.generate(spec), prompts):
            for into in (cold, warm):
                result = await runner.send_one(session, server.url, request, time.perf_counter())
                if not runner.succeeded(result) or result.ttft_s is None:
                    raise RuntimeError(f"{server.target} failed a probe: {result.error}")
                into.append(result.ttft_s)
    return summary.percentile(cold, 0.5), summary.percentile(warm, 0.5)


@dataclass(frozen=True, slots=True)
class Cell:
    """What explains one router-and-load cell besides its TTFT."""

    server_prefix_hit_rate: float
    busiest_server_share: float
    ttft_p50_hit_s: float
    ttft_p50_miss_s: float
    # CPU the machine spent outside this benchmark's processes (other work on a shared
    # machine competes with the pinned servers), and the precise picker's, in cores.
    other_work_cores: float
    precise_picker_cores: float


def results_table(
    series: dict[str, list[tuple[float, summary.Summary]]], cells: dict[str, dict[float, Cell]]
) -> str:
    lines = [
        "| router | load | req/s | TTFT p50 ms | TTFT p90 ms | servers' prefix hit "
        "| busiest server's share | TTFT p50 ms, hit / miss | other work, cores |",
        "|" + "---|" * 9,
    ]
    for name, points in series.items():
        for load, s in points:
            c = cells[name][load]
            lines.append(
                f"| {name} | {load:.0%} | {s.throughput_rps:.1f} | {s.ttft_p50_s * 1000:.0f} "
                f"| {s.ttft_p90_s * 1000:.0f} | {c.server_prefix_hit_rate:.0%} "
                f"| {c.busiest_server_share:.0%} "
                f"| {c.ttft_p50_hit_s * 1000:.0f} / {c.ttft_p50_miss_s * 1000:.0f} "
                f"| {c.other_work_cores:.2f} |"
            )
    return "\n".join(lines)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    loads = [0.5, 0.8, 1.0]
    collector = f"tcp://127.0.0.1:{free_tcp_port()}"
    # vLLM connects its publisher there (no `*` in the endpoint); the precise picker binds.
    model, kv_bytes_per_token = MODELS[args.model]
    settings = dataclasses.replace(
        SETTINGS,
        model=model,
        kv_bytes_per_token=kv_bytes_per_token,
        kv_cache_bytes=args.kv_cache_mib * 2**20 or KV_CACHE_TOKENS * kv_bytes_per_token,
        kv_events_collector=collector,
    )
    recorded = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    out: dict[str, object] = {"loads": loads, "settings": recorded}
    async with AsyncExitStack() as stack:
        servers = await stack.enter_async_context(vllm.vllm_servers(SERVERS, settings))
        backends = [s.target for s in servers]
        cache_tokens, block_size = await pool_cache_tokens(servers)
        request_tokens = await prompt_tokens(servers[0], workload(0, 1))
        tenants = math.ceil(args.working_set * cache_tokens / request_tokens)
        out.update(
            pool_cache_tokens=cache_tokens, block_size=block_size,
            request_tokens=request_tokens, tenants=tenants,
        )  # fmt: skip
        print(
            f"pool KV cache {cache_tokens} tokens (blocks of {block_size}); requests of "
            f"~{request_tokens} tokens; {tenants} tenants: working set "
            f"{tenants * request_tokens / cache_tokens:.1f}x the cache",
            flush=True,
        )
        cold, warm = await what_a_hit_saves(servers[0], workload(5, tenants))
        out["idle_ttft_cold_s"], out["idle_ttft_cached_s"] = cold, warm
        print(f"idle server TTFT: {cold * 1000:.0f} ms cold, {warm * 1000:.0f} ms cached")
        urls: dict[str, str] = {}
        direct = {
            "round-robin": gateway_settings.LbPolicy.ROUND_ROBIN,
            "least-request": gateway_settings.LbPolicy.LEAST_REQUEST,
        }
        for name, policy in direct.items():
            urls[name] = await stack.enter_async_context(harness.direct_envoy(backends, policy))
        precise = precise_config(
            settings.model, collector, workdir / "precise-prefix.yaml", model=vllm.MODEL_NAME
        )
        metrics_port = free_tcp_port()
        precise_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        pickers = {
            "approximate": picker(backends),
            "precise": picker(backends, ["--config-file", str(precise)], metrics_port),
        }
        picker_pids: dict[str, int] = {}
        for name, started in pickers.items():
            process, port = await stack.enter_async_context(started)
            picker_pids[name] = process.pid
            options = gateway_settings.GatewayOptions(picker_port=port)
            urls[name] = (await stack.enter_async_context(EnvoyProcess(options))).url
        if sglang_router_binary():
            urls["sglang-router"] = await stack.enter_async_context(sglang_router(backends))
        else:
            print("sglang-router not installed (scripts/setup test,compare): skipped")

        capacity = summary.summarise(
            await measure(
                urls.pop("least-request"), workload(99, tenants), args.calibration_requests,
                None, concurrency=4 * settings.max_num_seqs,
            )
        ).throughput_rps  # fmt: skip
        out["capacity_rps"] = capacity
        print(f"pool capacity (closed loop, least-request): {capacity:.2f} req/s", flush=True)
        # Calibration traffic went past the precise picker's collector: both servers' event
        # streams must have reached it, or its index would be blind to one server.
        stored = await wait_for_counter(
            precise_metrics, 'inference_extension_kv_events_total{outcome="BlockStored"}', 1, 30
        )
        print(f"precise picker: {stored:g} BlockStored events so far", flush=True)

        series: dict[str, list[tuple[float, summary.Summary]]] = {name: [] for name in urls}
        cells: dict[str, dict[float, Cell]] = {name: {} for name in urls}
        picker_during: dict[str, float] = {}
        rows = []
        for name, url in urls.items():
            cleared = (await precise_picker_counters(precise_metrics)).get(CLEARED, 0.0)
            await reset_prefix_caches(servers)
            # The precise index must have emptied too (one AllBlocksCleared per server).
            await wait_for_counter(precise_metrics, CLEARED, cleared + SERVERS, 30)
            counters_before = await precise_picker_counters(precise_metrics)
            await measure(url, workload(7, tenants), args.warmup_requests, None, concurrency=8)
            for load in loads:
                rate = capacity * load
                requests = max(50, int(rate * args.seconds))
                hits_before, queries_before = await server_prefix_counters(backends)
                finished_before = await finished_per_server(servers)
                clock = harness.CpuClock(picker_pids["precise"])
                results = await measure(
                    url, workload(int(load * 100), tenants), requests, rate, concurrency=64
                )
                other_cores, picker_cores = clock.lap()
                hits_after, queries_after = await server_prefix_counters(backends)
                queried = queries_after - queries_before
                cell = cells[name][load] = Cell(
                    (hits_after - hits_before) / queried if queried else 0.0,
                    busiest_share(finished_before, await finished_per_server(servers)),
                    *ttft_p50_by_hit(results),
                    other_cores,
                    picker_cores,
                )
                runner.write_jsonl(
                    results, RESULTS / f"precise_vllm_{name}_{int(load * 100)}.jsonl"
                )
                s = summary.summarise(results)
                series[name].append((load, s))
                rows.append((f"{name} @ {load:.0%}", s))
                print(
                    summary.table([rows[-1]]).splitlines()[-1],
                    f"server prefix hit {cell.server_prefix_hit_rate:.0%}, busiest server "
                    f"{cell.busiest_server_share:.0%}, other work {other_cores:.2f} cores, "
                    f"precise picker {picker_cores:.2f} cores",
                    flush=True,
                )
            if name == "precise":
                picker_during = change(
                    counters_before, await precise_picker_counters(precise_metrics)
                )
        out["runs"] = {
            name: [{"load": load, **asdict(cells[name][load]), **asdict(s)} for load, s in points]
            for name, points in series.items()
        }
        out["table"] = results_table(series, cells)
        print(summary.table(rows))
        print(out["table"])
        by_load = {name: dict(points) for name, points in series.items()}
        for load in loads:
            rr = by_load["round-robin"][load]
            for name, points in by_load.items():
                s = points[load]
                print(
                    f"at {load:.0%}: {name} TTFT p90 {s.ttft_p90_s * 1000:.0f} ms (round-robin "
                    f"/ it = {rr.ttft_p90_s / s.ttft_p90_s:.2f}x), server prefix hit "
                    f"{cells[name][load].server_prefix_hit_rate:.0%}"
                )
        out["precise_picker_during_its_runs"] = picker_during
        out["precise_picker_total"] = await precise_picker_counters(precise_metrics)
        print("precise picker, during its warm-up and runs:", picker_during)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45.0, help="per load level and router")
    parser.add_argument("--calibration-requests", type=int, default=400)
    parser.add_argument("--warmup-requests", type=int, default=200)
    parser.add_argument(
        "--kv-cache-mib", type=int, default=0,
        help=f"per server (default: {KV_CACHE_TOKENS} tokens of the model's)",
    )  # fmt: skip
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="bench",
        help="bench: scripts/vllm-setup --bench-model's; tiny: the tests' model",
    )  # fmt: skip
    parser.add_argument(
        "--working-set", type=float, default=2.5, help="tenants' contexts / the pool's KV cache"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.calibration_requests = 20.0, 200
    reason = vllm.bench_model_missing_reason() if args.model == "bench" else vllm.missing_reason()
    if reason is not None:
        raise SystemExit(f"needs a real vLLM: {reason}")
    with tempfile.TemporaryDirectory(prefix="precise-routing-vllm-") as workdir:
        results = asyncio.run(run(args, Path(workdir)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "precise_routing_vllm.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
