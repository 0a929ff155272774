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


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sluice bench", description=__doc__)
    a = p.add_argument
    a(
        "--url",
        help="gateway base URL, e.g. http://127.0.0.1:8081 (default: none; required unless "
        "--summarise)",
    )
    a("--requests", type=int, default=200, help="requests to send (default: %(default)s)")
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--rate", type=float, help="open loop: Poisson arrivals per second (default: closed loop)"
    )
    load.add_argument(
        "--concurrency", type=int, default=16,
        help="closed loop: requests in flight (default: %(default)s)",
    )  # fmt: skip
    a(
        "--workload", default="shared-prefix", choices=["shared-prefix", "multi-turn", "random"],
        help="what to send (default: %(default)s)",
    )  # fmt: skip
    a("--model", default="sim-model", help="model name in the requests (default: %(default)s)")
    a(
        "--groups", type=int, default=8,
        help="prefix groups, or conversations for multi-turn (default: %(default)s)",
    )  # fmt: skip
    a(
        "--prefix-tokens", type=int, default=1000,
        help="length of each group's shared system prompt (default: %(default)s)",
    )  # fmt: skip
    a(
        "--question-tokens", type=int, default=50,
        help="length of each request's own part (default: %(default)s)",
    )  # fmt: skip
    a("--max-tokens", type=int, default=32, help="max_tokens per request (default: %(default)s)")
    a(
        "--loras", default="",
        help="comma-separated adapters to spread requests over, '' entry = base model "
        "(default: none, the base model only)",
    )  # fmt: skip
    a(
        "--criticality-mix", type=_mix, default=(),
        help="X-Workload-Context criticality:weight,..., e.g. 1:0.3,3:0.5,5:0.2 "
        "(default: none, no X-Workload-Context header)",
    )  # fmt: skip
    a("--slo-ttft-ms", type=float, help="x-slo-ttft-ms header value (default: not sent)")
    a("--slo-tpot-ms", type=float, help="x-slo-tpot-ms header value (default: not sent)")
    a(
        "--slo-fraction", type=float, default=1.0,
        help="share of requests with the SLO headers (default: %(default)s)",
    )  # fmt: skip
    a(
        "--prefix-skew", type=float, default=0.0,
        help="Zipf exponent of prefix-group popularity, 0 = uniform, 1 = skewed "
        "(default: %(default)s)",
    )  # fmt: skip
    a(
        "--no-stream", dest="stream", action="store_false",
        help="ask for whole responses instead of streams (default: streamed)",
    )  # fmt: skip
    a(
        "--seed", type=int, default=0,
        help="request order, questions, arrivals (default: %(default)s)",
    )  # fmt: skip
    a("--out", type=Path, help="write per-request JSON lines here (default: not written)")
    a(
        "--summarise", type=Path, nargs="+",
        help="summarise earlier JSON-lines runs instead of sending (default: send a run)",
    )  # fmt: skip
    a("--plot", type=Path, help="write a PNG of the run(s) here; needs matplotlib (default: none)")
    a(
        "--pods", type=_names, default=(),
        help="comma-separated names of every pod of the pool, as its servers report them in "
        "x-inference-pod: the per-pod plot then shows pods that served nothing "
        "(default: only pods that answered at least once)",
    )  # fmt: skip
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
    if args.plot:
        try:
            plots.require_matplotlib()  # before any load: a run can take minutes
        except plots.PlottingUnavailable as error:
            print(f"sluice bench: --plot: {error}", file=sys.stderr)
            return 2
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
    for title, key in (("criticality", summary.criticality_of), ("SLO", summary.slo_of)):
        rows = [(name, g) for name, results in runs for g in summary.breakdown(results, key)]
        if rows:
            print()
            print(summary.breakdown_table(title, rows))
    for name, results in runs:
        failed = summary.failures(results)
        if failed:
            run = f"{name}: " if len(runs) > 1 else ""
            print(f"sluice bench: {run}{failed}", file=sys.stderr)
    if args.plot:
        plots.plot_runs(runs, args.plot, args.pods)
        print(f"plot: {args.plot}")
    sent = runs[0][1]
    if not args.summarise and sent and not any(runner.succeeded(r) for r in sent):
        return 1  # nothing got through: a script running the bench should stop here
    return 0
