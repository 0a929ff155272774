"""What the picker adds to the request path, measured against baselines in the same run.

Same simulated backends (1 ms per output token), same open-loop load, for two Envoy
configurations — `shipped` (buffered request body, streamed response the picker switches
off per request: what Sluice's demo, chart and docs run) and `full-duplex` (both bodies
FULL_DUPLEX_STREAMED: what gateways configured by others run) — three gateways each:
  direct   Envoy -> backends (round robin, no ext_proc)
  null     Envoy -> do-nothing ext_proc (bench/null_extproc.py) -> backends: protocol floor
  picker   Envoy -> `sluice picker` (default profile, response sample rate 0.01) -> backends

Shapes: a non-streamed completion (1 token), streamed completions of 16/64/256/1024
tokens, and a 200 KB prompt. Reports latency p50/p99 and the time to the first streamed
byte per gateway, what the picker adds over direct, and CPU per request of the ext_proc
process (picker vs null; the picker's idle scraping subtracted). `--ceiling` also runs one
picker and one null server closed loop until they saturate.

    .venv/bin/python -m bench.picker_overhead --rate 20 --duration 15     # ~15 minutes
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
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.harness import PYTHON, child, cpu_seconds, simulators
from bench.harness import picker as picker_process
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port

HERE = Path(__file__).resolve().parent
BodyMode = envoy_config.BodyMode
CONFIGS = {
    "shipped": (BodyMode.BUFFERED, BodyMode.STREAMED),
    "full-duplex": (BodyMode.FULL_DUPLEX_STREAMED, BodyMode.FULL_DUPLEX_STREAMED),
}
GATEWAYS = ("direct", "null", "picker")


@dataclass(frozen=True)
class Shape:
    name: str
    prompt_bytes: int
    tokens: int
    stream: bool


SHAPES = (
    Shape("1 KB, 1 token", 1_000, 1, False),
    Shape("1 KB, streamed 16", 1_000, 16, True),
    Shape("1 KB, streamed 64", 1_000, 64, True),
    Shape("1 KB, streamed 256", 1_000, 256, True),
    Shape("1 KB, streamed 1024", 1_000, 1024, True),
    Shape("200 KB, 1 token", 200_000, 1, False),
)


def make_body(shape: Shape, rng: random.Random) -> bytes:
    prompt = "".join(rng.choices(string.ascii_lowercase + " ", k=shape.prompt_bytes))
    document: dict[str, object] = {
        "model": "sim-model",
        "prompt": prompt,
        "max_tokens": shape.tokens,
    }
    if shape.stream:
        document["stream"] = True
        document["stream_options"] = {"include_usage": True}
    return json.dumps(document).encode()


async def load(
    url: str, bodies: list[bytes], rate: float | None, concurrency: int = 0
) -> tuple[list[float], list[float], float]:
    """Open loop at `rate` (request i starts at i/rate s), or closed loop with
    `concurrency` in flight; returns latencies, times to the first body byte, wall time."""
    latencies: list[float] = []
    first_bytes: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: bytes) -> None:
            nonlocal errors
            started = time.perf_counter()
            async with session.post(
                url, data=body, headers={"content-type": "application/json"}
            ) as r:
                first = await r.content.readany()
                first_bytes.append(time.perf_counter() - started)
                while first:
                    first = await r.content.readany()
                if r.status != 200:
                    errors += 1
                    return
            latencies.append(time.perf_counter() - started)

        t0 = time.perf_counter()
        if rate is not None:
            tasks = []
            for i, body in enumerate(bodies):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(body)))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(bodies))

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if errors:
        print(f"  {errors} requests failed", file=sys.stderr)
    return latencies, first_bytes, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {"rate": args.rate, "duration_s": args.duration, "runs": []}
    sim_args = [
        "--time-to-first-token", "0", "--prefill-time-per-token", "0",
        "--inter-token-latency", "1", "--decode-batch-factor", "0",
        "--kv-cache-size", "400000", "--max-num-seqs", "1024",
        # The backends must not be the bottleneck: no prefix hashing of 200 KB prompts.
        "--no-enable-prefix-caching",
    ]  # fmt: skip
    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(args.backends, sim_args))
        picker, picker_port = await stack.enter_async_context(
            picker_process(backends, ["--response-sample-rate", str(args.sample_rate)])
        )
        null_port = free_tcp_port()
        null = await stack.enter_async_context(
            child(PYTHON, str(HERE / "null_extproc.py"), "--port", str(null_port),
                  "--endpoints", ",".join(backends))
        )  # fmt: skip
        pids = {"null": null.pid, "picker": picker.pid}
        envoys: dict[tuple[str, str], EnvoyProcess] = {}
        for config, (request_mode, response_mode) in CONFIGS.items():
            modes = {"request_body_mode": request_mode, "response_body_mode": response_mode}
            options = {
                "direct": envoy_config.GatewayOptions(
                    mode=envoy_config.GatewayMode.DIRECT, backends=tuple(backends)
                ),
                "null": envoy_config.GatewayOptions(picker_port=null_port, **modes),
                "picker": envoy_config.GatewayOptions(picker_port=picker_port, **modes),
            }
            for name, option in options.items():
                envoy = EnvoyProcess(option, concurrency=1)
                envoys[(config, name)] = await stack.enter_async_context(envoy)
        # The picker scrapes every backend every 50 ms whether or not requests flow; measure
        # that background rate so the request path's own CPU can be reported separately.
        idle_before, idle_t0 = cpu_seconds(picker.pid), time.monotonic()
        await asyncio.sleep(args.idle_window)
        idle_rate = (cpu_seconds(picker.pid) - idle_before) / (time.monotonic() - idle_t0)
        results["picker_idle_cpu_fraction"] = idle_rate
        print(f"picker idle CPU (metrics scraping): {idle_rate * 100:.1f}% of a core", flush=True)
        rng = random.Random(1)
        shapes = [s for s in SHAPES if s.name in args.shapes] if args.shapes else list(SHAPES)
        for shape in shapes:
            count = int(args.rate * args.duration)
            bodies = [make_body(shape, rng) for _ in range(count)]
            warm = bodies[: max(10, count // 10)]
            for config in CONFIGS:
                for name in GATEWAYS:
                    url = envoys[(config, name)].url + "/v1/completions"
                    await load(url, warm, args.rate)
                    pid = pids.get(name)
                    cpu_before, t_before = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
                    latencies, first_bytes, _ = await load(url, bodies, args.rate)
                    cpu = (cpu_seconds(pid) - cpu_before) if pid else 0.0
                    if name == "picker":
                        cpu -= idle_rate * (time.monotonic() - t_before)
                    row = {
                        "config": config,
                        "gateway": name,
                        "shape": shape.name,
                        "requests": len(latencies),
                        "p50_ms": percentile(latencies, 0.5) * 1000,
                        "p99_ms": percentile(latencies, 0.99) * 1000,
                        "first_byte_p50_ms": percentile(first_bytes, 0.5) * 1000,
                        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else None,
                        "extproc_cpu_us_per_request": (
                            cpu / max(len(latencies), 1) * 1e6 if pid else None
                        ),
                    }
                    results["runs"].append(row)  # type: ignore[attr-defined]
                    print(json.dumps(row), flush=True)
        if args.ceiling:
            results["ceiling"] = await ceilings(envoys, pids, idle_rate, args, rng)
    return results


async def ceilings(
    envoys: dict[tuple[str, str], EnvoyProcess],
    pids: dict[str, int],
    idle_rate: float,
    args: argparse.Namespace,
    rng: random.Random,
) -> list[dict[str, object]]:
    """Closed loop, 64 in flight, non-streamed 1 KB requests: the most one process serves."""
    rows = []
    bodies = [make_body(SHAPES[0], rng) for _ in range(args.ceiling_requests)]
    for config in CONFIGS:
        for name in ("null", "picker"):
            url = envoys[(config, name)].url + "/v1/completions"
            await load(url, bodies[:200], None, concurrency=64)
            cpu_before = cpu_seconds(pids[name])
            latencies, _, wall = await load(url, bodies, None, concurrency=64)
            cpu = cpu_seconds(pids[name]) - cpu_before
            row = {
                "config": config,
                "gateway": name,
                "requests_per_s": len(latencies) / wall,
                "cpu_fraction": cpu / wall,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def report(results: dict[str, object]) -> str:
    runs: list[dict[str, object]] = results["runs"]  # type: ignore[assignment]
    lines = [
        f"rate {results['rate']} req/s, {results['duration_s']} s per run; picker idle CPU "
        f"(scraping) {float(results['picker_idle_cpu_fraction']) * 100:.1f}% of a core, "  # type: ignore[arg-type]
        "subtracted from its per-request CPU",
        "",
        "| config | shape | null CPU µs | picker CPU µs | picker/null | added p50 ms | "
        "added p99 ms | added first byte p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        for shape in dict.fromkeys(r["shape"] for r in runs):
            rows = {r["gateway"]: r for r in runs if r["config"] == config and r["shape"] == shape}
            if len(rows) < 3:
                continue
            base, null, picker = rows["direct"], rows["null"], rows["picker"]
            null_cpu = float(null["extproc_cpu_us_per_request"])  # type: ignore[arg-type]
            picker_cpu = float(picker["extproc_cpu_us_per_request"])  # type: ignore[arg-type]
            lines.append(
                f"| {config} | {shape} | {null_cpu:.0f} | {picker_cpu:.0f} | "
                f"{picker_cpu / null_cpu:.2f}x | "
                f"{float(picker['p50_ms']) - float(base['p50_ms']):+.2f} | "  # type: ignore[arg-type]
                f"{float(picker['p99_ms']) - float(base['p99_ms']):+.2f} | "  # type: ignore[arg-type]
                f"{float(picker['first_byte_p50_ms']) - float(base['first_byte_p50_ms']):+.2f} |"  # type: ignore[arg-type]
            )
    for row in results.get("ceiling", []):  # type: ignore[attr-defined]
        lines.append(
            f"\nceiling {row['config']} {row['gateway']}: {row['requests_per_s']:.0f} req/s "
            f"at {float(row['cpu_fraction']) * 100:.0f}% of a core"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--backends", type=int, default=2)
    parser.add_argument("--sample-rate", type=float, default=0.01, help="picker's response sample")
    parser.add_argument("--shapes", nargs="*", default=[], help="shape names (default: all)")
    parser.add_argument("--ceiling", action="store_true", help="also the closed-loop ceiling")
    parser.add_argument("--ceiling-requests", type=int, default=3000)
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
