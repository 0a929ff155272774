"""PNG plots of runs. They need matplotlib, which `scripts/setup test` (or `scripts/setup
bench`) installs into `.venv`; `require_matplotlib` lets a command check before it works."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sluice.loadgen.runner import RequestResult, succeeded
from sluice.loadgen.summary import Summary

MISSING = (
    "matplotlib is not installed in this environment; install it with scripts/setup bench "
    "(or scripts/setup test) from the repository root"
)


class PlottingUnavailable(RuntimeError):
    """matplotlib cannot be imported."""


def require_matplotlib() -> None:
    """Raise PlottingUnavailable (one line) unless plots can be drawn."""
    _pyplot()


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlottingUnavailable(MISSING) from None
    return plt


def plot_runs(
    runs: Sequence[tuple[str, Sequence[RequestResult]]], path: Path, pods: Sequence[str] = ()
) -> None:
    """TTFT CDF, TTFT over the run, and requests per pod, one line/bar group per run.
    `pods`: every pod of the pool, so that pods that served nothing show as 0; pods seen
    in the results and not listed are added after them."""
    plt = _pyplot()
    figure, (cdf, over_time, per_pod) = plt.subplots(1, 3, figsize=(18, 4.5))
    for name, results in runs:
        ttfts = sorted(r.ttft_s * 1000 for r in results if succeeded(r) and r.ttft_s is not None)
        if ttfts:
            cdf.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=name)
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (ms, log scale)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("Time to first token")
    cdf.grid(True, alpha=0.3)
    cdf.legend()
    for name, results in runs:
        points = [
            (r.start_s, r.ttft_s * 1000) for r in results if succeeded(r) and r.ttft_s is not None
        ]
        over_time.scatter([t for t, _ in points], [v for _, v in points], s=6, label=name)
    over_time.set_yscale("log")
    over_time.set_xlabel("request sent at (s since the run started)")
    over_time.set_ylabel("TTFT (ms, log scale)")
    over_time.set_title("Time to first token over the run")
    over_time.grid(True, alpha=0.3)
    over_time.legend()
    names, counts_per_run = served_per_pod(runs, pods)
    width = 0.8 / max(1, len(runs))
    for i, ((name, _), counts) in enumerate(zip(runs, counts_per_run, strict=True)):
        per_pod.bar([x + i * width for x in range(len(names))], counts, width, label=name)
    per_pod.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=45)
    per_pod.set_title("Requests served per pod")
    per_pod.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def served_per_pod(
    runs: Sequence[tuple[str, Sequence[RequestResult]]], pods: Sequence[str] = ()
) -> tuple[list[str], list[list[int]]]:
    """Pod names (`pods` first, then any other pod that answered) and, per run, how many
    requests each served successfully."""
    answered = sorted({r.pod for _, results in runs for r in results if r.pod})
    names = [*pods, *(pod for pod in answered if pod not in pods)]
    counts = [
        [sum(1 for r in results if succeeded(r) and r.pod == pod) for pod in names]
        for _, results in runs
    ]
    return names, counts


def plot_comparison(series: dict[str, list[tuple[float, Summary]]], path: Path, title: str) -> None:
    """TTFT p90, throughput and prefix-hit rate against offered load, one line per gateway."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("TTFT p90 (ms)", lambda s: s.ttft_p90_s * 1000, True),
        ("throughput (req/s)", lambda s: s.throughput_rps, False),
        ("prefix-cache hit rate", lambda s: s.prefix_hit_rate, False),
    )
    for axis, (label, value, log) in zip(axes, panels, strict=True):
        for name, points in series.items():
            axis.plot([load for load, _ in points], [value(s) for _, s in points], "o-", label=name)
        axis.set_xlabel("offered load (fraction of pool capacity)")
        axis.set_title(label)
        if log:
            axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
