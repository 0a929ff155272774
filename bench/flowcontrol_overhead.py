"""What flow control costs when the pool has room: flowControl gate on vs off.

Same simulated backends, two `sluice picker` processes (gate off: the default config;
gate on: `workload-aware-ordering-policy`, default detector), one Envoy each. Requests
carry `X-Workload-Context` from 20 workloads with mixed criticality. Two measurements,
alternating off/on `--rounds` times so drift hits both alike:

  throughput   closed loop, `--concurrency` clients, `--duration` s: completed req/s, and
               the picker's CPU per request (its idle scraping CPU subtracted), which
               contention from other processes on the machine disturbs far less
  latency      open loop at `--rate` req/s for `--duration` s: p50 / p99

    /tmp/venv/bin/python -m bench.flowcontrol_overhead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp

from bench.harness import cpu_seconds, simulators
from bench.harness import picker as picker_process
from bench.picker_overhead import percentile
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess

HERE = Path(__file__).resolve().parent
FLOW_ON = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: workload-aware-ordering-policy
"""
BODY = json.dumps({"model": "sim-model", "prompt": "hello " * 40, "max_tokens": 1}).encode()


def contexts(rng: random.Random, count: int) -> list[str]:
    return [
        json.dumps({"workload_id": f"w{rng.randrange(20)}", "criticality": rng.randint(1, 5)})
        for _ in range(count)
    ]


async def open_loop(url: str, rate: float, count: int) -> list[float]:
    """Request i starts at i/rate s whatever happened before; latencies of the 200s."""
    rng = random.Random(3)
    headers = [
        {"content-type": "application/json", "x-workload-context": c} for c in contexts(rng, count)
    ]
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> None:
            started = time.perf_counter()
            async with session.post(url, data=BODY, headers=headers[i]) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - started)

        t0 = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return latencies


async def closed_loop(url: str, concurrency: int, duration_s: float) -> tuple[int, float]:
    done = 0
    deadline = time.perf_counter() + duration_s
    rng = random.Random(2)
    headers_pool = [
        {"content-type": "application/json", "x-workload-context": c} for c in contexts(rng, 200)
    ]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < deadline:
                async with session.post(url, data=BODY, headers=headers_pool[i % 200]) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        return done, time.perf_counter() - start


async def run(args: argparse.Namespace) -> dict[str, object]:
    sim_args = [
        "--time-to-first-token", "0", "--prefill-time-per-token", "0",
        "--inter-token-latency", "0", "--kv-cache-size", "400000", "--max-num-seqs", "1024",
    ]  # fmt: skip
    runs: list[dict[str, object]] = []
    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(args.backends, sim_args))
        envoys = {}
        pids = {}
        for name, extra in (("off", []), ("on", ["--config-text", FLOW_ON])):
            process, port = await stack.enter_async_context(picker_process(backends, extra))
            pids[name] = process.pid
            envoys[name] = await stack.enter_async_context(
                EnvoyProcess(envoy_config.GatewayOptions(picker_port=port), concurrency=1)
            )
        count = int(args.rate * args.duration)
        for envoy in envoys.values():  # warm up
            await open_loop(envoy.url + "/v1/completions", args.rate, count // 5)
        idle = {}
        for name, pid in pids.items():  # both scrape the same backends in the background
            before, t0 = cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(3)
            idle[name] = (cpu_seconds(pid) - before) / (time.monotonic() - t0)
        for round_ in range(args.rounds):
            for name, envoy in envoys.items():
                url = envoy.url + "/v1/completions"
                cpu_before = cpu_seconds(pids[name])
                done, elapsed = await closed_loop(url, args.concurrency, args.duration)
                cpu = cpu_seconds(pids[name]) - cpu_before - idle[name] * elapsed
                rps = done / elapsed
                latencies = await open_loop(url, args.rate, count)
                run = {
                    "round": round_,
                    "flow_control": name,
                    "throughput_rps": rps,
                    "picker_cpu_us_per_request": cpu / max(1, done) * 1e6,
                    "p50_ms": percentile(latencies, 0.5) * 1000,
                    "p99_ms": percentile(latencies, 0.99) * 1000,
                    "requests": len(latencies),
                }
                runs.append(run)
                print(json.dumps(run), flush=True)
    return {"rate": args.rate, "duration_s": args.duration, "runs": runs}


def summary(results: dict[str, object]) -> str:
    runs = results["runs"]
    by = {
        name: [r for r in runs if r["flow_control"] == name]  # type: ignore[attr-defined]
        for name in ("off", "on")
    }

    def mean(name: str, key: str) -> float:  # the median over rounds: robust to a noisy one
        return statistics.median(float(r[key]) for r in by[name])

    lines = [
        "| flow control | throughput req/s | picker CPU µs/req | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for name in ("off", "on"):
        lines.append(
            f"| {name} | {mean(name, 'throughput_rps'):.0f} | "
            f"{mean(name, 'picker_cpu_us_per_request'):.0f} | {mean(name, 'p50_ms'):.2f} | "
            f"{mean(name, 'p99_ms'):.2f} |"
        )
    throughput = mean("on", "throughput_rps") / mean("off", "throughput_rps")
    cpu = mean("on", "picker_cpu_us_per_request") / mean("off", "picker_cpu_us_per_request")
    lines.append(
        f"| on / off | {throughput * 100:.0f}% | {cpu:.2f}x | "
        f"{mean('on', 'p50_ms') - mean('off', 'p50_ms'):+.2f} | "
        f"{mean('on', 'p99_ms') - mean('off', 'p99_ms'):+.2f} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", type=int, default=2)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "flowcontrol_overhead.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(summary(results))


if __name__ == "__main__":
    main()
