"""SLO attainment and goodput on a heterogeneous pool: default vs slo-aware vs
predicted-latency pickers, same pool, same run.

Four simulated vLLM servers in one process, two of them at 0.4x speed (`--replica-speeds`),
KV caches too small for every shared prefix, a shared-prefix workload whose requests carry
a TTFT objective (`x-slo-ttft-ms`), open-loop Poisson load at fractions of the pool's
capacity (measured first, in the same run, closed loop through the default picker).
Each picker gets the same warm-up pass first (it warms the servers' caches and trains the
latency predictor), then the load levels in increasing order.

    .venv/bin/python -m bench.slo_routing            # ~12 minutes
    .venv/bin/python -m bench.slo_routing --quick    # ~5 minutes, noisier

`--workload mixed` replaces the single-objective workload with two classes of traffic:
interactive requests (70%: short chat turns over 8 shared system prompts, 16 output
tokens, TTFT objective `--slo-ms`) and batch requests (30%: unique 1,000-token documents,
64 output tokens, a loose TTFT objective of `--batch-slo-ms`). Attainment is reported per
class as well as overall.

`--workload unique` shares nothing, so only the servers' speeds decide: every request is a
unique ~400-token prompt with 16 output tokens (an idle fast server answers its first token
in ~220 ms, an idle slow one in ~550 ms), objective 800 ms unless `--slo-ms` says otherwise
(the rule, fixed before the first run: 1.5x a slow server's idle TTFT, so that either kind
of server can meet it, a fast one with a queue, a slow one only with little ahead).

Every picker gets a pool of its own, started afresh (servers, picker, Envoy), then the
same warm-up. Until 2026-12-03 the pickers took turns on one pool: first with the caches
the previous picker left, later with the caches emptied between them, and still the
picker that ran second met ~10 points fewer objectives than when it ran first (an
order-swap run, bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from bench.harness import picker, simulators
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.loadgen import plots, runner, summary, workloads
from sluice.loadgen.workloads import RequestSpec

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS = HERE.parent / "docs" / "configs"

SIM_ARGS = [
    "--max-num-seqs", "4",
    "--time-to-first-token", "20",
    "--prefill-time-per-token", "0.5",
    "--inter-token-latency", "20",
    "--kv-cache-size", "600",
    "--block-size", "16",
    "--replica-speeds", "1,0.4",
]  # fmt: skip
PICKERS = {
    "default": None,
    "predicted-latency": CONFIGS / "predicted-latency.yaml",
    "slo-aware": CONFIGS / "slo-aware.yaml",
}


def workload(seed: int, slo_ttft_ms: float) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind="shared-prefix",
        groups=16,
        prefix_tokens=600,
        question_tokens=40,
        max_tokens=16,
        slo_ttft_ms=slo_ttft_ms,
        seed=seed,
    )


def unique_workload(seed: int, slo_ms: float) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind="random", question_tokens=400, max_tokens=16, slo_ttft_ms=slo_ms, seed=seed
    )


def mixed_workload(seed: int, slo_ms: float, batch_slo_ms: float) -> Iterator[RequestSpec]:
    interactive = workloads.WorkloadSpec(
        kind="shared-prefix", groups=8, prefix_tokens=600, question_tokens=40,
        max_tokens=16, slo_ttft_ms=slo_ms, seed=seed,
    )  # fmt: skip
    batch = workloads.WorkloadSpec(
        kind="random", question_tokens=1000, max_tokens=64, slo_ttft_ms=batch_slo_ms,
        seed=seed + 1000,
    )  # fmt: skip
    return workloads.mix([(interactive, 0.7), (batch, 0.3)], seed=seed)


@asynccontextmanager
async def gateway(config: Path | None, args: argparse.Namespace) -> AsyncIterator[str]:
    """A fresh pool of simulators behind a picker with `config` (None: the default) and an
    Envoy; yields the Envoy's URL."""
    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(4, SIM_ARGS))
        extra = ["--response-sample-rate", str(args.sample_rate)]
        extra += ["--config-file", str(config)] if config else []
        _, port = await stack.enter_async_context(picker(backends, extra))
        envoy = EnvoyProcess(gateway_settings.GatewayOptions(picker_port=port))
        yield (await stack.enter_async_context(envoy)).url


async def measure(
    url: str,
    requests: int,
    rate: float | None,
    seed: int,
    args: argparse.Namespace,
    concurrency: int = 64,
) -> list[runner.RequestResult]:
    plan = runner.LoadPlan(
        url=url, requests=requests, rate=rate, concurrency=concurrency, seed=seed
    )
    if args.workload == "mixed":
        stream = mixed_workload(seed, args.slo_ms, args.batch_slo_ms)
    elif args.workload == "unique":
        stream = workloads.generate(unique_workload(seed, args.slo_ms))
    else:
        stream = workloads.generate(workload(seed, args.slo_ms))
    return await runner.run_load(plan, stream)


async def run(args: argparse.Namespace) -> dict[str, object]:
    loads: list[float] = args.loads
    out: dict[str, object] = {
        "loads": loads,
        "sim_args": SIM_ARGS,
        "workload": args.workload,
        "slo_ttft_ms": args.slo_ms,
    }
    pickers = dict(PICKERS)
    pickers.update(args.config)
    selected = {n: c for n, c in pickers.items() if not args.pickers or n in args.pickers}
    capacity = args.capacity
    if not capacity:
        async with gateway(PICKERS["default"], args) as url:
            calibration = await measure(url, args.calibration_requests, None, 99, args)
        capacity = summary.summarise(calibration).throughput_rps
    out["capacity_rps"] = capacity
    print(f"pool capacity (closed loop, default picker): {capacity:.1f} req/s", flush=True)
    series: dict[str, list[tuple[float, summary.Summary]]] = {name: [] for name in selected}
    rows = []
    classes = []
    suffix = _suffix(args.workload)
    for name, config in selected.items():
        async with gateway(config, args) as url:
            # Warm-up: the servers' caches, and the latency predictor's first samples.
            await measure(url, args.warmup_requests, None, 7, args, concurrency=8)
            for load in loads:
                rate = capacity * load
                requests = max(50, int(rate * args.seconds))
                results = await measure(url, requests, rate, int(load * 100), args)
                runner.write_jsonl(results, RESULTS / f"slo{suffix}_{name}_{int(load * 100)}.jsonl")
                s = summary.summarise(results)
                classes += [
                    (f"{name} @ {load:.0%}", g) for g in summary.breakdown(results, summary.slo_of)
                ]
                series[name].append((load, s))
                rows.append((f"{name} @ {load:.0%}", s))
                print(summary.table([rows[-1]]).splitlines()[-1], flush=True)
    out["runs"] = {
        name: [{"load": load, **asdict(s)} for load, s in points] for name, points in series.items()
    }
    table = summary.table(rows)
    if classes:
        table += "\n\n" + summary.breakdown_table("objective", classes)
    out["table"] = table
    print(table)
    at_80 = {name: dict(points)[0.8] for name, points in series.items() if 0.8 in loads}
    for name, s in at_80.items():
        print(
            f"at 80% load: {name} SLO attainment {s.slo_attainment:.0%}, "
            f"goodput {s.goodput_rps:.1f} req/s, TTFT p90 {s.ttft_p90_s * 1000:.0f} ms"
        )
    try:
        plots.plot_comparison(
            series,
            RESULTS / f"slo_routing{suffix}.png",
            "Heterogeneous pool (2 fast, 2 at 0.4x)",
        )
    except RuntimeError as error:
        print(f"no plot: {error}")
    return out


def _suffix(workload: str) -> str:
    """The result files' suffix: `_<workload>`, none for the shared-prefix workload."""
    return "" if workload == "shared-prefix" else f"_{workload}"


def _named_path(value: str) -> tuple[str, Path]:
    name, _, path = value.partition("=")
    return name, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=40.0, help="per load level and picker")
    parser.add_argument("--calibration-requests", type=int, default=400)
    parser.add_argument("--warmup-requests", type=int, default=250)
    parser.add_argument("--slo-ms", type=float, help="TTFT objective (default 300; unique: 800)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--sample-rate", type=float, default=1.0,
        help="pickers' --response-sample-rate: the responses the latency predictor learns "
        "from (the picker's default 0.01 leaves it cold for a run this short)",
    )  # fmt: skip
    parser.add_argument(
        "--workload", choices=("shared-prefix", "mixed", "unique"), default="shared-prefix"
    )
    parser.add_argument(
        "--batch-slo-ms", type=float, default=3000.0, help="mixed: the batch class's TTFT"
    )
    parser.add_argument(
        "--pickers", type=lambda v: set(v.split(",")), default=set(),
        help="only these (comma-separated; default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--loads", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.8, 1.0, 1.2],
        help="fractions of capacity (comma-separated)",
    )  # fmt: skip
    parser.add_argument("--capacity", type=float, default=0.0, help="req/s; skips calibration")
    parser.add_argument(
        "--config", type=_named_path, action="append", default=[],
        help="NAME=PATH: also run a picker with this config",
    )  # fmt: skip
    args = parser.parse_args()
    if args.slo_ms is None:
        args.slo_ms = 800.0 if args.workload == "unique" else 300.0
    if args.quick:
        args.seconds, args.calibration_requests = 15.0, 200
    results = asyncio.run(run(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"slo_routing{_suffix(args.workload)}.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
