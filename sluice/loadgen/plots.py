"""PNG plots of runs (needs matplotlib: `pip install 'sluice[bench]'`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sluice.loadgen.runner import RequestResult
from sluice.loadgen.summary import Summary


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("plots need matplotlib: pip install 'sluice[bench]'") from error
    return plt


def plot_runs(runs: Sequence[tuple[str, Sequence[RequestResult]]], path: Path) -> None:
    """TTFT CDF and requests per pod, one line/bar group per run."""
    plt = _pyplot()
    figure, (cdf, pods) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, results in runs:
        ttfts = sorted(r.ttft_s * 1000 for r in results if r.status == 200 and r.ttft_s is not None)
        if ttfts:
            cdf.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=name)
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (ms, log scale)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("Time to first token")
    cdf.grid(True, alpha=0.3)
    cdf.legend()
    names = sorted({r.pod for _, results in runs for r in results if r.pod})
    width = 0.8 / max(1, len(runs))
    for i, (name, results) in enumerate(runs):
        counts = [sum(1 for r in results if r.pod == pod) for pod in names]
        pods.bar([x + i * width for x in range(len(names))], counts, width, label=name)
    pods.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=45)
    pods.set_title("Requests served per pod")
    pods.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
