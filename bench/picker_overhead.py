"""What the picker adds to the request path, measured against baselines in the same run.

Same simulated backends, same open-loop load, three gateways:
  direct   Envoy -> backends (round robin, no ext_proc)
  null     Envoy -> do-nothing ext_proc (bench/null_extproc.py) -> backends: protocol floor
  picker   Envoy -> `sluice picker` (default profile) -> backends

Reports, per prompt size: latency p50/p99 per gateway, latency the picker adds over
direct, and CPU seconds per request of the ext_proc process (picker vs null).

    .venv/bin/python bench/picker_overhead.py --rate 100 --duration 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import string
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp

from bench.harness import PYTHON, child, cpu_seconds, simulators
from bench.harness import picker as picker_process
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port

HERE = Path(__file__).resolve().parent


def make_body(size: int, rng: random.Random) -> bytes:
    prompt = "".join(rng.choices(string.ascii_lowercase + " ", k=size))
    return json.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 1}).encode()


async def load(url: str, bodies: list[bytes], rate: float) -> list[float]:
    """Open loop: request i starts at i/rate seconds regardless of earlier answers."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: bytes) -> None:
            nonlocal errors
            started = time.perf_counter()
            async with session.post(
                url, data=body, headers={"content-type": "application/json"}
            ) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
            latencies.append(time.perf_counter() - started)

        t0 = time.perf_counter()
        tasks = []
        for i, body in enumerate(bodies):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
    if errors:
        print(f"  {errors} requests failed", file=sys.stderr)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    null_port = free_tcp_port()
    results: dict[str, object] = {"rate": args.rate, "duration_s": args.duration, "runs": []}
    sim_args = [
        "--time-to-first-token", "0", "--prefill-time-per-token", "0",
        "--inter-token-latency", "0", "--kv-cache-size", "400000", "--max-num-seqs", "1024",
        # The backends must not be the bottleneck: no prefix hashing of 200 KB prompts.
        "--no-enable-prefix-caching",
    ]  # fmt: skip
    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(args.backends, sim_args))
        picker, picker_port = await stack.enter_async_context(picker_process(backends))
        null = await stack.enter_async_context(
            child(
                PYTHON,
                str(HERE / "null_extproc.py"),
                "--port",
                str(null_port),
                "--endpoints",
                ",".join(backends),
            )
        )
        gateways = {
            "direct": envoy_config.GatewayOptions(
                mode=envoy_config.GatewayMode.DIRECT, backends=tuple(backends)
            ),
            "null": envoy_config.GatewayOptions(picker_port=null_port),
            "picker": envoy_config.GatewayOptions(picker_port=picker_port),
        }
        envoys = {}
        for name, options in gateways.items():
            envoys[name] = await stack.enter_async_context(EnvoyProcess(options, concurrency=1))
        # The picker scrapes every backend every 50 ms whether or not requests flow; measure
        # that background rate so the request path's own CPU can be reported separately.
        idle_before, idle_t0 = cpu_seconds(picker.pid), time.monotonic()
        await asyncio.sleep(args.idle_window)
        idle_rate = (cpu_seconds(picker.pid) - idle_before) / (time.monotonic() - idle_t0)
        results["picker_idle_cpu_fraction"] = idle_rate
        print(f"picker idle CPU (metrics scraping): {idle_rate * 100:.1f}% of a core", flush=True)
        rng = random.Random(1)
        for size in args.sizes:
            count = int(args.rate * args.duration)
            bodies = [make_body(size, rng) for _ in range(count)]
            warm = bodies[: max(20, count // 10)]
            for name in ("direct", "null", "picker"):
                url = envoys[name].url + "/v1/completions"
                await load(url, warm, args.rate)
                pid = {"null": null.pid, "picker": picker.pid}.get(name)
                cpu_before, t_before = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
                latencies = await load(url, bodies, args.rate)
                cpu = (cpu_seconds(pid) - cpu_before) if pid else 0.0
                if name == "picker":
                    cpu -= idle_rate * (time.monotonic() - t_before)
                run = {
                    "gateway": name,
                    "prompt_bytes": size,
                    "requests": len(latencies),
                    "p50_ms": percentile(latencies, 0.5) * 1000,
                    "p99_ms": percentile(latencies, 0.99) * 1000,
                    "mean_ms": statistics.fmean(latencies) * 1000,
                    # picker: request-path CPU only (background scraping subtracted).
                    "extproc_cpu_us_per_request": cpu / len(latencies) * 1e6 if pid else None,
                }
                results["runs"].append(run)  # type: ignore[attr-defined]
                print(json.dumps(run), flush=True)
    return results


def report(results: dict[str, object]) -> str:
    runs = results["runs"]
    lines = [
        f"rate {results['rate']} req/s, {results['duration_s']} s per run; picker idle CPU "
        f"(scraping) {float(results['picker_idle_cpu_fraction']) * 100:.1f}% of a core, "  # type: ignore[arg-type]
        "subtracted from its per-request CPU",
        "",
        "| prompt | gateway | p50 ms | p99 ms | added p50 | added p99 | ext_proc CPU µs/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in sorted({r["prompt_bytes"] for r in runs}):  # type: ignore[attr-defined]
        rows = {r["gateway"]: r for r in runs if r["prompt_bytes"] == size}  # type: ignore[attr-defined]
        base = rows["direct"]
        for name in ("direct", "null", "picker"):
            r = rows[name]
            cpu = r["extproc_cpu_us_per_request"]
            lines.append(
                f"| {size // 1000} KB | {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['p50_ms'] - base['p50_ms']:+.2f} | {r['p99_ms'] - base['p99_ms']:+.2f} | "
                f"{'' if cpu is None else f'{cpu:.0f}'} |"
            )
        picker_cpu = rows["picker"]["extproc_cpu_us_per_request"]
        null_cpu = rows["null"]["extproc_cpu_us_per_request"]
        lines.append(
            f"| {size // 1000} KB | picker/null CPU | | | | | {picker_cpu / null_cpu:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 200_000])
    parser.add_argument(
        "--idle-window", type=float, default=5.0, help="seconds to measure idle CPU"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "picker_overhead.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
