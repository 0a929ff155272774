"""X-Workload-Context extraction: bad headers run as `default`, WorkloadClass caps."""

from __future__ import annotations

import pytest

from epp import metrics
from epp.datastore.snapshot import WorkloadClass
from epp.flowcontrol import workload
from epp.flowcontrol.workload import HeaderProblem


def invalid_count(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value("workload_context_invalid_total", {"reason": reason})
    return value or 0.0


def test_valid_header() -> None:
    ctx = workload.extract('{"workload_id": "fraud", "criticality": 5}', {})
    assert (ctx.workload_id, ctx.criticality, ctx.problem) == ("fraud", 5, HeaderProblem.NONE)


def test_missing_criticality_uses_the_default() -> None:
    ctx = workload.extract('{"workload_id": "fraud"}', {}, default_criticality=2)
    assert (ctx.workload_id, ctx.criticality) == ("fraud", 2)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (None, HeaderProblem.MISSING),
        ("", HeaderProblem.MISSING),
        ("{not json", HeaderProblem.INVALID_JSON),
        ("[1, 2]", HeaderProblem.NOT_AN_OBJECT),
        ('"fraud"', HeaderProblem.NOT_AN_OBJECT),
        ('{"criticality": 4}', HeaderProblem.BAD_WORKLOAD_ID),
        ('{"workload_id": "", "criticality": 4}', HeaderProblem.BAD_WORKLOAD_ID),
        ('{"workload_id": "   "}', HeaderProblem.BAD_WORKLOAD_ID),
        ('{"workload_id": 7}', HeaderProblem.BAD_WORKLOAD_ID),
        ('{"workload_id": "' + "x" * 300 + '"}', HeaderProblem.BAD_WORKLOAD_ID),
        ('{"workload_id": "a", "criticality": 0}', HeaderProblem.BAD_CRITICALITY),
        ('{"workload_id": "a", "criticality": 6}', HeaderProblem.BAD_CRITICALITY),
        ('{"workload_id": "a", "criticality": 2.5}', HeaderProblem.BAD_CRITICALITY),
        ('{"workload_id": "a", "criticality": true}', HeaderProblem.BAD_CRITICALITY),
        ('{"workload_id": "a", "criticality": "5"}', HeaderProblem.BAD_CRITICALITY),
        ('{"workload_id": "a", "criticality": null}', HeaderProblem.BAD_CRITICALITY),
    ],
)
def test_bad_headers_run_as_the_default_workload(
    header: str | None, problem: HeaderProblem
) -> None:
    before = invalid_count(problem.value)
    ctx = workload.extract(header, {})
    assert (ctx.workload_id, ctx.criticality, ctx.problem) == ("default", 3, problem)
    counted = invalid_count(problem.value) - before
    assert counted == (0 if problem is HeaderProblem.MISSING else 1)


def test_integral_float_criticality_is_accepted() -> None:
    assert workload.extract('{"workload_id": "a", "criticality": 4.0}', {}).criticality == 4


def test_workload_class_caps_the_claim_and_supplies_the_default() -> None:
    classes = {"batch": WorkloadClass("batch", "ns", "batch", criticality=2)}
    capped = workload.extract('{"workload_id": "batch", "criticality": 5}', classes)
    assert (capped.criticality, capped.claimed_criticality) == (2, 5)
    lower = workload.extract('{"workload_id": "batch", "criticality": 1}', classes)
    assert lower.criticality == 1
    unclaimed = workload.extract('{"workload_id": "batch"}', classes)
    assert unclaimed.criticality == 2
    other = workload.extract('{"workload_id": "other", "criticality": 5}', classes)
    assert other.criticality == 5
