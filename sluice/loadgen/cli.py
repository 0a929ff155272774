"""`sluice bench`: send a workload at a gateway, record it, summarise it, plot it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from sluice.loadgen import plots, runner, summary, workloads


def _mix(text: str) -> tuple[tuple[int, float], ...]:
    """`1:0.3,3:0.5,5:0.2` -> ((1, 0.3), (3, 0.5), (5, 0.2))."""
    try:
        pairs = [part.split(":") for part in text.split(",") if part]
        mix = tuple((int(level), float(weight)) for level, weight in pairs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected criticality:weight,..., got {text!r}") from None
    if not mix or any(not 1 <= level <= 5 or weight < 0 for level, weight in mix):
        raise argparse.ArgumentTypeError(f"criticality 1-5 and weights >= 0, got {text!r}")
    return mix


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice bench", description=__doc__)
    p.add_argument("--url", help="gateway base URL, e.g. http://127.0.0.1:8081")
    p.add_argument("--requests", type=int, default=200)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument("--concurrency", type=int, default=16, help="closed loop: in flight")
    p.add_argument(
        "--workload", default="shared-prefix", choices=["shared-prefix", "multi-turn", "random"]
    )
    p.add_argument("--model", default="sim-model")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--question-tokens", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--loras", default="", help="comma-separated adapters ('' entry = base model)")
    p.add_argument("--criticality-mix", type=_mix, default=(), help="e.g. 1:0.3,3:0.5,5:0.2")
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-tpot-ms", type=float)
    p.add_argument(
        "--slo-fraction", type=float, default=1.0, help="share of requests with the SLO headers"
    )
    p.add_argument(
        "--prefix-skew", type=float, default=0.0,
        help="Zipf exponent of prefix-group popularity (0 = uniform; 1 = skewed)",
    )
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write per-request JSON lines here")
    p.add_argument("--summarise", type=Path, nargs="+", help="summarise earlier JSON-lines runs")
    p.add_argument("--plot", type=Path, help="write a PNG of the run(s)")
    return p


def _spec(args: argparse.Namespace) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind=args.workload,
        model=args.model,
        groups=args.groups,
        prefix_tokens=args.prefix_tokens,
        question_tokens=args.question_tokens,
        max_tokens=args.max_tokens,
        loras=tuple(args.loras.split(",")) if args.loras else (),
        criticality_mix=args.criticality_mix,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        slo_fraction=args.slo_fraction,
        prefix_skew=args.prefix_skew,
        stream=args.stream,
        seed=args.seed,
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.summarise:
        runs = [(path.stem, runner.read_jsonl(path)) for path in args.summarise]
    else:
        if not args.url:
            print("sluice bench: --url is required unless --summarise is given", file=sys.stderr)
            return 2
        try:
            spec = _spec(args)
        except ValueError as error:
            print(f"sluice bench: {error}", file=sys.stderr)
            return 2
        plan = runner.LoadPlan(
            url=args.url.rstrip("/"),
            requests=args.requests,
            rate=args.rate,
            concurrency=args.concurrency,
            seed=args.seed,
            progress=True,
        )
        results = asyncio.run(runner.run_load(plan, workloads.generate(spec)))
        if args.out:
            runner.write_jsonl(results, args.out)
        runs = [(args.workload, results)]
    print(summary.table([(name, summary.summarise(results)) for name, results in runs]))
    if args.plot:
        plots.plot_runs(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0
