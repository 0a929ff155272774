"""Percentiles, throughput, goodput under SLO and prefix-hit rate of one run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sluice.loadgen.runner import RequestResult


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    succeeded: int
    duration_s: float
    throughput_rps: float
    output_tokens_per_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    latency_p50_s: float
    latency_p99_s: float
    goodput_rps: float  # successful requests per second that met their SLOs
    slo_attainment: float | None  # of requests carrying an SLO, the share that met it
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens
    per_pod: dict[str, int]


def _met_slo(r: RequestResult) -> bool:
    if r.status != 200:
        return False
    if r.slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > r.slo_ttft_ms):
        return False
    return not (
        r.slo_tpot_ms is not None and r.tpot_s is not None and r.tpot_s * 1000 > r.slo_tpot_ms
    )


def _attainment(results: Sequence[RequestResult]) -> float | None:
    with_slo = [r for r in results if r.slo_ttft_ms is not None or r.slo_tpot_ms is not None]
    if not with_slo:
        return None
    return sum(1 for r in with_slo if _met_slo(r)) / len(with_slo)


def summarise(results: Sequence[RequestResult]) -> Summary:
    ok = [r for r in results if r.status == 200]
    if results:
        duration = max(r.start_s + r.latency_s for r in results) - min(r.start_s for r in results)
    else:
        duration = 0.0
    duration = max(duration, 1e-9)
    prompt = sum(r.prompt_tokens for r in ok)
    return Summary(
        requests=len(results),
        succeeded=len(ok),
        duration_s=duration,
        throughput_rps=len(ok) / duration,
        output_tokens_per_s=sum(r.completion_tokens for r in ok) / duration,
        ttft_p50_s=percentile([r.ttft_s for r in ok if r.ttft_s is not None], 0.5),
        ttft_p90_s=percentile([r.ttft_s for r in ok if r.ttft_s is not None], 0.9),
        ttft_p99_s=percentile([r.ttft_s for r in ok if r.ttft_s is not None], 0.99),
        tpot_p50_s=percentile([r.tpot_s for r in ok if r.tpot_s is not None], 0.5),
        tpot_p90_s=percentile([r.tpot_s for r in ok if r.tpot_s is not None], 0.9),
        latency_p50_s=percentile([r.latency_s for r in ok], 0.5),
        latency_p99_s=percentile([r.latency_s for r in ok], 0.99),
        goodput_rps=sum(1 for r in results if _met_slo(r)) / duration,
        slo_attainment=_attainment(results),
        prefix_hit_rate=sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        per_pod=dict(sorted(Counter(r.pod for r in ok).items())),
    )


def table(rows: Sequence[tuple[str, Summary]]) -> str:
    header = (
        "| run | ok/total | req/s | tok/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms "
        "| TPOT p50 ms | e2e p99 ms | goodput req/s | SLO met | prefix hit |"
    )
    lines = [header, "|" + "---|" * 12]
    for name, s in rows:
        cells = [
            name,
            f"{s.succeeded}/{s.requests}",
            f"{s.throughput_rps:.1f}",
            f"{s.output_tokens_per_s:.0f}",
            f"{s.ttft_p50_s * 1000:.0f}",
            f"{s.ttft_p90_s * 1000:.0f}",
            f"{s.ttft_p99_s * 1000:.0f}",
            f"{s.tpot_p50_s * 1000:.1f}",
            f"{s.latency_p99_s * 1000:.0f}",
            f"{s.goodput_rps:.1f}",
            "-" if s.slo_attainment is None else f"{s.slo_attainment:.0%}",
            f"{s.prefix_hit_rate:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
