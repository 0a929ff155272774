"""`prometheus-metric`: selectors, aggregation, missing series, and its factory's errors."""

from __future__ import annotations

import pytest

from epp.datalayer import custom_metrics
from epp.datalayer.endpoint_metrics import NEVER_SCRAPED
from epp.datalayer.prometheus_text import MetricsPage
from epp.datastore.snapshot import Endpoint, EndpointKey

ENDPOINT = Endpoint(EndpointKey("ns/p-rank-0"), "p", "ns", "127.0.0.1", 8000)
PAGE = MetricsPage(
    "# TYPE q gauge\n"
    'q{model="a",zone="x"} 2\n'
    'q{model="b",zone="y"} 5\n'
    'q{model="c"} 11\n'
    'q{model="d",zone="x"} NaN\n'
    'q_bucket{le="1"} 100\n'
)


def _extract(params: dict[str, object], page: MetricsPage = PAGE) -> dict[str, float]:
    extractor = custom_metrics.new_prometheus_metric_extractor("load", params)
    return dict(extractor.extract(page, ENDPOINT, NEVER_SCRAPED).custom)


@pytest.mark.parametrize(
    ("selector", "aggregation", "expected"),
    [
        ("q", "sum", 18.0),  # NaN skipped, q_bucket not matched
        ('q{model="b"}', "sum", 5.0),
        ('q{zone="x"}', "sum", 2.0),
        ('q{zone=""}', "sum", 11.0),  # a missing label equals the empty string
        ('q{zone!="x"}', "max", 11.0),
        ('q{model=~"a|b"}', "avg", 3.5),
        ('q{model=~"a|b", zone!~"y"}', "min", 2.0),
        ('q{model=~"[ab]"}', "max", 5.0),
        (' q { model = "a" , } ', "sum", 2.0),
    ],
)
def test_selectors_and_aggregations(selector: str, aggregation: str, expected: float) -> None:
    assert _extract({"selector": selector, "aggregation": aggregation}) == {"load": expected}


def test_metric_name_and_missing_series_removes_the_value() -> None:
    extractor = custom_metrics.new_prometheus_metric_extractor(
        "x", {"selector": 'q{model="a"}', "metricName": "depth"}
    )
    assert extractor.produces == frozenset({"depth"})
    first = extractor.extract(PAGE, ENDPOINT, NEVER_SCRAPED)
    assert first.custom == {"depth": 2.0}
    assert extractor.extract(PAGE, ENDPOINT, first) is first  # unchanged: same object
    gone = extractor.extract(MetricsPage("other 1\n"), ENDPOINT, first)
    assert "depth" not in gone.custom
    other = custom_metrics.new_prometheus_metric_extractor("y", {"selector": "q"})
    both = other.extract(PAGE, ENDPOINT, first)
    assert both.custom == {"depth": 2.0, "y": 18.0}  # extractors add to one map


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "selector: required"),
        ({"selector": '{a="b"}'}, "must start with a metric name"),
        ({"selector": 'q{a="b"'}, r"expected '\{label"),
        ({"selector": "q{a=b}"}, "cannot read a label matcher"),
        ({"selector": 'q{a=~"("}'}, "bad regex"),
        ({"selector": 'q{a="1" b="2"}'}, "expected ','"),
        ({"selector": "q", "aggregation": "maxx"}, "aggregation: .*did you mean .max"),
        ({"selector": "q", "selektor": "q"}, "selektor: unknown parameter"),
    ],
)
def test_factory_errors_name_the_parameter(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        custom_metrics.new_prometheus_metric_extractor("load", params)
