"""What a request asks of the pool, read once from its headers and the snapshot: its
priority (an `InferenceObjective`), its workload (`X-Workload-Context`, capped by a
`WorkloadClass`) and its latency objectives.

Latency objectives come from `x-slo-ttft-ms` / `x-slo-tpot-ms` (llm-d's
`x-llm-d-slo-ttft-ms` / `x-llm-d-slo-tpot-ms` are accepted too), else from the workload's
`WorkloadClass` (`spec.slo`). A malformed value is treated as absent and counted in
`inference_extension_slo_header_invalid_total{header}`; it never fails the request.
What the objectives change about routing is for plugins to decide (the `slo-aware`
profile, the SLO deadline ordering policy), not for the request path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from epp import metrics
from epp.datastore.snapshot import SloTargets, Snapshot
from epp.flowcontrol import workload

OBJECTIVE_HEADER = "x-gateway-inference-objective"
TTFT_HEADERS = ("x-slo-ttft-ms", "x-llm-d-slo-ttft-ms")
TPOT_HEADERS = ("x-slo-tpot-ms", "x-llm-d-slo-tpot-ms")
# An objective of more than a day is a unit mistake, not a latency objective.
MAX_SLO_MS = 86_400_000.0


@dataclass(frozen=True, slots=True)
class Objectives:
    priority: int
    workload: workload.WorkloadContext
    slo: SloTargets | None  # None: no latency objective


def read(headers: Mapping[str, str], snapshot: Snapshot, default_criticality: int) -> Objectives:
    name = headers.get(OBJECTIVE_HEADER, "")
    objective = snapshot.objectives.get(name) if name else None
    context = workload.extract(
        headers.get(workload.HEADER), snapshot.workload_classes, default_criticality
    )
    slo = _slo_headers(headers)
    if slo is None:
        workload_class = snapshot.workload_classes.get(context.workload_id)
        if workload_class is not None and (
            workload_class.slo.ttft_ms is not None or workload_class.slo.tpot_ms is not None
        ):
            slo = workload_class.slo
    return Objectives(objective.priority if objective is not None else 0, context, slo)


def _slo_headers(headers: Mapping[str, str]) -> SloTargets | None:
    ttft = _milliseconds(headers, TTFT_HEADERS)
    tpot = _milliseconds(headers, TPOT_HEADERS)
    if ttft is None and tpot is None:
        return None
    return SloTargets(ttft_ms=ttft, tpot_ms=tpot)


def _milliseconds(headers: Mapping[str, str], names: tuple[str, ...]) -> float | None:
    for name in names:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if 0.0 < value <= MAX_SLO_MS:  # also rejects NaN and infinities
            return value
        metrics.slo_header_invalid_total.labels(name).inc()
    return None
