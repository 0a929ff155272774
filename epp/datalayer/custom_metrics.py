"""`prometheus-metric` extractor: any gauge or counter into `EndpointMetrics.custom`.

The extractor selects series on the fetched page with a PromQL-style selector,

    my_queue_depth{model_name="llama", pool=~"a|b", zone!="x"}

(matchers `=`, `!=`, `=~`, `!~`; regexes are anchored as in PromQL), combines the matching
series (`aggregation`: `sum` (default), `max`, `min`, `avg`) and stores the value under
`metricName` (default: the plugin's name) in the endpoint's `custom` map, where
`metric-scorer` and other consumers read it. Non-finite values are skipped. When no
series matches, the name is removed from `custom`, so consumers see "missing" and apply
their own default rather than a value that stopped being true.

Parameters: `selector` (required), `metricName`, `aggregation`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from epp import parameters
from epp.datalayer import prometheus_text
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import Endpoint

PROMETHEUS_METRIC: Final = "prometheus-metric"

_NAME = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_AGGREGATIONS: Final[Mapping[str, Callable[[list[float]], float]]] = {
    "sum": math.fsum,
    "max": max,
    "min": min,
    "avg": lambda values: math.fsum(values) / len(values),
}


@dataclass(frozen=True, slots=True)
class LabelMatcher:
    label: str
    op: str  # "=", "!=", "=~", "!~"
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.label, "")  # PromQL: a missing label is the empty string
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.pattern is not None
        found = self.pattern.fullmatch(actual) is not None
        return found if self.op == "=~" else not found


@dataclass(frozen=True, slots=True)
class Selector:
    metric: str
    matchers: tuple[LabelMatcher, ...] = ()

    def select(self, page: prometheus_text.MetricsPage) -> list[float]:
        matchers = self.matchers
        return [
            s.value
            for s in page.samples(self.metric)
            if math.isfinite(s.value) and all(m.matches(s.labels) for m in matchers)
        ]


def parse_selector(text: str) -> Selector:
    """`name{label="v",...}` into a Selector; ValueError says what is wrong and where."""
    match = _NAME.match(text)
    if match is None:
        raise ValueError(f"selector {text!r} must start with a metric name")
    metric, pos = match.group(1), match.end()
    if pos == len(text):
        return Selector(metric)
    if text[pos] != "{" or not text.rstrip().endswith("}"):
        raise ValueError(
            f"selector {text!r}: expected '{{label=\"value\", ...}}' after the metric name"
        )
    body = text[pos + 1 : text.rstrip().rfind("}")]
    matchers: list[LabelMatcher] = []
    at = 0
    while at < len(body) and body[at:].strip():
        m = _MATCHER.match(body, at)
        if m is None:
            raise ValueError(
                f"selector {text!r}: cannot read a label matcher at {body[at:].strip()!r} "
                '(expected label="v", label!="v", label=~"re" or label!~"re")'
            )
        label, op, raw = m.groups()
        value = raw.replace('\\"', '"').replace("\\\\", "\\")
        pattern = None
        if op in ("=~", "!~"):
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise ValueError(f"selector {text!r}: bad regex {value!r}: {exc}") from None
        matchers.append(LabelMatcher(label, op, value, pattern))
        at = m.end()
        if at < len(body):
            if body[at] != ",":
                raise ValueError(f"selector {text!r}: expected ',' between label matchers")
            at += 1
    return Selector(metric, tuple(matchers))


class PrometheusMetricExtractor:
    type_name: Final = PROMETHEUS_METRIC
    input_type: Final = prometheus_text.MetricsPage

    def __init__(
        self,
        name: str,
        selector: Selector,
        *,
        metric_name: str | None = None,
        aggregation: str = "sum",
    ) -> None:
        if aggregation not in _AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {', '.join(_AGGREGATIONS)}, got {aggregation!r}"
            )
        self._name = name
        self.selector = selector
        self.metric_name = metric_name or name
        self.aggregation = aggregation
        self._combine = _AGGREGATIONS[aggregation]

    @property
    def name(self) -> str:
        return self._name

    @property
    def produces(self) -> frozenset[str]:
        return frozenset((self.metric_name,))

    def extract(
        self, payload: Any, endpoint: Endpoint, current: EndpointMetrics
    ) -> EndpointMetrics:
        page: prometheus_text.MetricsPage = payload
        values = self.selector.select(page)
        custom = current.custom
        key = self.metric_name
        if not values:
            if key not in custom:
                return current
            return _with_custom(current, {k: v for k, v in custom.items() if k != key})
        value = self._combine(values)
        if custom.get(key) == value:
            return current
        return _with_custom(current, {**custom, key: value})


def _with_custom(current: EndpointMetrics, custom: dict[str, float]) -> EndpointMetrics:
    return dataclasses.replace(current, custom=custom)


def new_prometheus_metric_extractor(
    name: str, params: Mapping[str, object] | None = None
) -> PrometheusMetricExtractor:
    reader = parameters.ParameterReader(params)
    if not reader.has("selector"):
        raise parameters.ParameterError(
            "selector",
            "required: the series to read, e.g. 'my_queue_depth{model_name=\"llama\"}'",
        )
    text = reader.string("selector", "")
    try:
        selector = parse_selector(text)
    except ValueError as exc:
        raise parameters.ParameterError("selector", str(exc)) from None
    metric_name = reader.string("metricName", name)
    aggregation = reader.string("aggregation", "sum")
    if aggregation not in _AGGREGATIONS:
        hint = parameters.did_you_mean(aggregation, _AGGREGATIONS)
        raise parameters.ParameterError(
            "aggregation", f"must be one of {', '.join(_AGGREGATIONS)}, got {aggregation!r}{hint}"
        )
    reader.finish()
    return PrometheusMetricExtractor(
        name, selector, metric_name=metric_name, aggregation=aggregation
    )
