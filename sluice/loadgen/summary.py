"""Percentiles, throughput, goodput under SLO and prefix-hit rate of one run; the same
per criticality and per SLO when a run mixes them; why requests failed."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from sluice.loadgen.runner import RequestResult, succeeded


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
    if not succeeded(r):
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
    ok = [r for r in results if succeeded(r)]
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
            _ms(s.ttft_p50_s),
            _ms(s.ttft_p90_s),
            _ms(s.ttft_p99_s),
            _ms(s.tpot_p50_s, ".1f"),
            _ms(s.latency_p99_s),
            f"{s.goodput_rps:.1f}",
            "-" if s.slo_attainment is None else f"{s.slo_attainment:.0%}",
            f"{s.prefix_hit_rate:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(seconds: float, form: str = ".0f") -> str:
    """Milliseconds for a table cell; `-` when there is no value (no request succeeded)."""
    return "-" if math.isnan(seconds) else f"{seconds * 1000:{form}}"


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """The requests of one run that share a criticality, or an SLO."""

    label: str
    requests: int
    succeeded: int
    ttft_p50_s: float
    ttft_p90_s: float
    slo_attainment: float | None  # None: none of them carried an SLO


def criticality_of(r: RequestResult) -> str:
    return "none sent" if r.criticality is None else str(r.criticality)


def slo_of(r: RequestResult) -> str:
    parts = []
    if r.slo_ttft_ms is not None:
        parts.append(f"TTFT {r.slo_ttft_ms:g} ms")
    if r.slo_tpot_ms is not None:
        parts.append(f"TPOT {r.slo_tpot_ms:g} ms")
    return ", ".join(parts) or "no SLO"


def breakdown(
    results: Sequence[RequestResult], key: Callable[[RequestResult], Hashable]
) -> list[GroupSummary]:
    """One summary per value of `key`; empty unless the run mixes two or more values."""
    groups: dict[Hashable, list[RequestResult]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r)
    if len(groups) < 2:
        return []
    rows = []
    for label, members in sorted(groups.items(), key=lambda item: str(item[0])):
        ttfts = [r.ttft_s for r in members if succeeded(r) and r.ttft_s is not None]
        rows.append(
            GroupSummary(
                label=str(label),
                requests=len(members),
                succeeded=sum(1 for r in members if succeeded(r)),
                ttft_p50_s=percentile(ttfts, 0.5),
                ttft_p90_s=percentile(ttfts, 0.9),
                slo_attainment=_attainment(members),
            )
        )
    return rows


def breakdown_table(title: str, rows: Sequence[tuple[str, GroupSummary]]) -> str:
    lines = [
        f"| run | {title} | ok/total | TTFT p50 ms | TTFT p90 ms | SLO met |",
        "|" + "---|" * 6,
    ]
    for name, g in rows:
        cells = [
            name,
            g.label,
            f"{g.succeeded}/{g.requests}",
            _ms(g.ttft_p50_s),
            _ms(g.ttft_p90_s),
            "-" if g.slo_attainment is None else f"{g.slo_attainment:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failure_reason(r: RequestResult) -> str:
    """Why a request failed, in words the same for every request that failed the same way."""
    if r.status not in (0, 200):
        detail = r.error.strip().splitlines()[0][:100] if r.error.strip() else ""
        return f"HTTP {r.status}: {detail}" if detail else f"HTTP {r.status}"
    return r.error or "no answer"


def failures(results: Sequence[RequestResult]) -> str | None:
    """`3 of 3 requests failed: connection refused to http://127.0.0.1:9/ (3)`, or None."""
    reasons = Counter(failure_reason(r) for r in results if not succeeded(r))
    if not reasons:
        return None
    failed = sum(reasons.values())
    grouped = ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common())
    return f"{failed} of {len(results)} requests failed: {grouped}"
