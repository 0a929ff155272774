"""The workload context a request carries: who sent it and how critical it is.

Clients claim it in `X-Workload-Context: {"workload_id": "...", "criticality": 1..5}`. A bad
header never fails a request: it is counted, logged at debug, and the request runs as the
`default` workload at the default criticality. A `WorkloadClass` for the id caps the
criticality the client may claim (the platform grants it) and supplies the default when the
client claims none.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NewType

import orjson

from epp import metrics
from epp.datastore.snapshot import WorkloadClass

log = logging.getLogger(__name__)

WorkloadId = NewType("WorkloadId", str)

HEADER = "x-workload-context"
DEFAULT_WORKLOAD = WorkloadId("default")
DEFAULT_CRITICALITY = 3
MIN_CRITICALITY = 1
MAX_CRITICALITY = 5
# Longer ids are rejected: they would become metric label values and registry keys.
MAX_WORKLOAD_ID_LENGTH = 253


class HeaderProblem(enum.Enum):
    NONE = "none"
    MISSING = "missing"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    BAD_WORKLOAD_ID = "bad_workload_id"
    BAD_CRITICALITY = "bad_criticality"


@dataclass(frozen=True, slots=True)
class WorkloadContext:
    """What admission and the ordering policy know about the request's sender."""

    workload_id: WorkloadId = DEFAULT_WORKLOAD
    criticality: int = DEFAULT_CRITICALITY
    # Why the header was not used (NONE when it was); for debugging priorities.
    problem: HeaderProblem = HeaderProblem.NONE
    # The criticality the client asked for before a WorkloadClass capped it (0: none asked).
    claimed_criticality: int = 0


def _criticality(value: object) -> int | None:
    # JSON numbers like 3.0 are accepted; booleans and fractions are not criticalities.
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and MIN_CRITICALITY <= value <= MAX_CRITICALITY:
        return value
    return None


def _fallback(problem: HeaderProblem, default_criticality: int) -> WorkloadContext:
    metrics.workload_context_invalid_total.labels(problem.value).inc()
    return WorkloadContext(DEFAULT_WORKLOAD, default_criticality, problem)


def extract(
    header: str | None,
    classes: Mapping[str, WorkloadClass],
    default_criticality: int = DEFAULT_CRITICALITY,
) -> WorkloadContext:
    """The request's workload context from its header value (None when absent)."""
    if header is None or not header.strip():
        return WorkloadContext(DEFAULT_WORKLOAD, default_criticality, HeaderProblem.MISSING)
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError:
        log.debug("bad %s header: not JSON", HEADER, extra={"header": header[:200]})
        return _fallback(HeaderProblem.INVALID_JSON, default_criticality)
    if not isinstance(document, dict):
        log.debug("bad %s header: not a JSON object", HEADER, extra={"header": header[:200]})
        return _fallback(HeaderProblem.NOT_AN_OBJECT, default_criticality)
    workload_id = document.get("workload_id")
    if (
        not isinstance(workload_id, str)
        or not workload_id.strip()
        or len(workload_id) > MAX_WORKLOAD_ID_LENGTH
    ):
        log.debug("bad %s header: workload_id", HEADER, extra={"header": header[:200]})
        return _fallback(HeaderProblem.BAD_WORKLOAD_ID, default_criticality)
    claimed: int | None = None
    if "criticality" in document:
        claimed = _criticality(document["criticality"])
        if claimed is None:
            log.debug("bad %s header: criticality", HEADER, extra={"header": header[:200]})
            return _fallback(HeaderProblem.BAD_CRITICALITY, default_criticality)
    context = WorkloadContext(
        WorkloadId(workload_id), claimed or default_criticality, HeaderProblem.NONE, claimed or 0
    )
    return _apply_class(context, classes, claimed)


def _apply_class(
    context: WorkloadContext, classes: Mapping[str, WorkloadClass], claimed: int | None
) -> WorkloadContext:
    workload_class = classes.get(context.workload_id)
    if workload_class is None:
        return context
    granted = workload_class.criticality
    criticality = granted if claimed is None else min(claimed, granted)
    if criticality == context.criticality:
        return context
    return WorkloadContext(
        context.workload_id, criticality, context.problem, context.claimed_criticality
    )
