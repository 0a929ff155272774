"""Routing quality: Envoy round-robin vs least-request vs the picker, same pool, same run.

Eight simulated vLLM servers whose KV caches cannot hold every shared prefix, a
shared-prefix workload (many users behind a few long system prompts), and open-loop
Poisson load at fractions of the pool's capacity. Capacity is measured first in the same
run: the closed-loop throughput of the pool behind Envoy least-request at high concurrency.

    .venv/bin/python -m bench.routing_quality            # ~6 minutes
    .venv/bin/python -m bench.routing_quality --quick    # ~2 minutes, noisier
"""

from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path

from bench.harness import picker, simulators
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.loadgen import plots, runner, summary, workloads

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# A model slow enough that Python on two cores can drive the pool to saturation, with
# prefill dominated by uncached prompt tokens (so cache affinity matters) and KV caches
# holding only a fraction of all prefixes.
SIM_ARGS = [
    "--max-num-seqs", "4",
    "--time-to-first-token", "20",
    "--prefill-time-per-token", "0.5",
    "--inter-token-latency", "20",
    "--kv-cache-size", "600",
    "--block-size", "16",
]  # fmt: skip


def workload(seed: int) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind="shared-prefix",
        groups=24,
        prefix_tokens=800,
        question_tokens=40,
        max_tokens=16,
        seed=seed,
    )


async def measure(url: str, requests: int, rate: float | None, seed: int, concurrency: int = 64):
    plan = runner.LoadPlan(
        url=url, requests=requests, rate=rate, concurrency=concurrency, seed=seed
    )
    return await runner.run_load(plan, workloads.generate(workload(seed)))


async def run(args: argparse.Namespace) -> dict[str, object]:
    loads = [0.5, 0.8, 1.0]
    out: dict[str, object] = {"loads": loads, "sim_args": SIM_ARGS}
    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(8, SIM_ARGS))
        _, picker_port = await stack.enter_async_context(picker(backends))
        gateways = {
            "round-robin": gateway_settings.GatewayOptions(
                mode=gateway_settings.GatewayMode.DIRECT,
                backends=tuple(backends),
                lb_policy=gateway_settings.LbPolicy.ROUND_ROBIN,
            ),
            "least-request": gateway_settings.GatewayOptions(
                mode=gateway_settings.GatewayMode.DIRECT,
                backends=tuple(backends),
                lb_policy=gateway_settings.LbPolicy.LEAST_REQUEST,
            ),
            "picker": gateway_settings.GatewayOptions(picker_port=picker_port),
        }
        urls = {}
        for name, options in gateways.items():
            urls[name] = (await stack.enter_async_context(EnvoyProcess(options))).url
        calibration = summary.summarise(
            await measure(urls["least-request"], args.calibration_requests, None, seed=99)
        )
        capacity = calibration.throughput_rps
        out["capacity_rps"] = capacity
        print(f"pool capacity (closed loop, least-request): {capacity:.1f} req/s", flush=True)
        series: dict[str, list[tuple[float, summary.Summary]]] = {name: [] for name in gateways}
        rows = []
        # Gateway by gateway: the simulators' caches carry over between runs, so each
        # gateway first gets the same warm-up pass over every prefix group (production pools
        # run warm), then its load levels in increasing order.
        for name, url in urls.items():
            await measure(url, workload(0).groups * 3, None, seed=7, concurrency=4)
            for load in loads:
                rate = capacity * load
                requests = max(50, int(rate * args.seconds))
                results = await measure(url, requests, rate, seed=int(load * 100))
                runner.write_jsonl(results, RESULTS / f"routing_{name}_{int(load * 100)}.jsonl")
                s = summary.summarise(results)
                series[name].append((load, s))
                rows.append((f"{name} @ {load:.0%}", s))
                print(summary.table([rows[-1]]).splitlines()[-1], flush=True)
        out["runs"] = {
            name: [{"load": load, **asdict(s)} for load, s in points]
            for name, points in series.items()
        }
        table = summary.table(rows)
        out["table"] = table
        print(table)
        with_picker = dict(series["picker"])[0.8]
        rr = dict(series["round-robin"])[0.8]
        ratio = rr.ttft_p90_s / with_picker.ttft_p90_s
        out["ttft_p90_ratio_rr_over_picker_at_80"] = ratio
        print(
            f"at 80% load: round-robin TTFT p90 / picker TTFT p90 = {ratio:.1f}x; throughput "
            f"picker {with_picker.throughput_rps:.1f} vs round-robin {rr.throughput_rps:.1f} req/s"
        )
        try:
            plots.plot_comparison(
                series, RESULTS / "routing_quality.png", "Shared-prefix workload, 8 servers"
            )
        except RuntimeError as error:
            print(f"no plot: {error}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=40.0, help="per load level and gateway")
    parser.add_argument("--calibration-requests", type=int, default=600)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.calibration_requests = 15.0, 300
    results = asyncio.run(run(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "routing_quality.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
