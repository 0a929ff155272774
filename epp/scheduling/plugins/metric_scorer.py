"""`metric-scorer`: scores endpoints by a custom metric the data layer extracted.

A `prometheus-metric` extractor (`epp.datalayer.custom_metrics`) puts a value into
`EndpointMetrics.custom[metricName]`; this scorer turns it into [0, 1]:

* with `min` and `max`: `(v - min) / (max - min)`, clamped;
* without them: min-max over this request's candidates (all equal -> 1.0);
* `direction: lower-is-better` (default) inverts the result, so a smaller value wins;
* a candidate without the metric (not exported yet, extractor failed) uses
  `defaultValue` when given, else scores 0 (worst case, as for stale candidates).

Parameters: `metricName` (required), `min`, `max`, `direction`
(`lower-is-better` | `higher-is-better`), `defaultValue`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from epp import parameters
from epp.scheduling.interfaces import Candidate, SchedulingRequest

LOWER_IS_BETTER = "lower-is-better"
HIGHER_IS_BETTER = "higher-is-better"
DIRECTIONS = (LOWER_IS_BETTER, HIGHER_IS_BETTER)


class MetricScorer:
    type_name = "metric-scorer"

    def __init__(
        self,
        name: str = type_name,
        *,
        metric_name: str,
        minimum: float | None = None,
        maximum: float | None = None,
        lower_is_better: bool = True,
        default_value: float | None = None,
    ) -> None:
        if (minimum is None) != (maximum is None):
            raise parameters.ParameterError(
                "min" if minimum is None else "max",
                "give both 'min' and 'max', or neither (then values are normalised over "
                "the candidates of each request)",
            )
        if minimum is not None and maximum is not None and not maximum > minimum:
            raise parameters.ParameterError(
                "max", f"must be greater than min ({minimum}), got {maximum}"
            )
        self.name = name
        self.metric_name = metric_name
        self.minimum = minimum
        self.maximum = maximum
        self.lower_is_better = lower_is_better
        self.default_value = default_value

    @property
    def consumes(self) -> frozenset[str]:
        """Custom metric names read; the config loader checks an extractor produces them."""
        return frozenset((self.metric_name,))

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> MetricScorer:
        reader = parameters.ParameterReader(params)
        if not reader.has("metricName"):
            raise parameters.ParameterError(
                "metricName",
                "required: the custom metric to score (as a prometheus-metric extractor names it)",
            )
        metric_name = reader.string("metricName", "")
        minimum = _optional_number(reader, "min")
        maximum = _optional_number(reader, "max")
        direction = reader.string("direction", LOWER_IS_BETTER)
        if direction not in DIRECTIONS:
            hint = parameters.did_you_mean(direction, DIRECTIONS)
            raise parameters.ParameterError(
                "direction", f"must be one of {', '.join(DIRECTIONS)}, got {direction!r}{hint}"
            )
        default_value = _optional_number(reader, "defaultValue")
        reader.finish()
        return cls(
            name,
            metric_name=metric_name,
            minimum=minimum,
            maximum=maximum,
            lower_is_better=direction == LOWER_IS_BETTER,
            default_value=default_value,
        )

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        name, default = self.metric_name, self.default_value
        values: list[float | None] = []
        for c in candidates:
            value = None if c.stale else c.metrics.custom.get(name, default)
            values.append(value if value is not None and math.isfinite(value) else None)
        low, high = self.minimum, self.maximum
        if low is None or high is None:
            present = [v for v in values if v is not None]
            if not present:
                return [0.0] * len(values)
            low, high = min(present), max(present)
            if high == low:
                return [0.0 if v is None else 1.0 for v in values]
        span = high - low
        lower = self.lower_is_better
        scores: list[float] = []
        for v in values:
            if v is None:
                scores.append(0.0)
                continue
            fraction = min(1.0, max(0.0, (v - low) / span))
            scores.append(1.0 - fraction if lower else fraction)
        return scores


def _optional_number(reader: parameters.ParameterReader, key: str) -> float | None:
    if not reader.has(key):
        reader.number(key, 0.0)  # marks the key as known for finish()
        return None
    value = reader.number(key, 0.0)
    if not math.isfinite(value):
        raise parameters.ParameterError(key, f"must be a finite number, got {value}")
    return value
