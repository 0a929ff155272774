"""`slo-request-tracker`: the latency predictor's eyes on the request lifecycle.

Pre-request: the request joins its endpoint's in-flight set (with its prompt tokens and
its prefix blocks), which is where the predictor's in-flight features and its count of
requests sharing a prefix come from, and its feature row for that endpoint is kept with
it. Response-complete (every path: success, upstream error, client
gone, protocol error — the lifecycle calls it exactly once): it leaves the set, and a
response that measured its latency becomes a training sample:

* streamed: TTFT = routing to the first body chunk; TPOT = the time between first and last
  chunk over the output tokens after the first (from the response's usage);
* not streamed: the first body chunk is the whole answer, so TTFT = that time minus the
  predicted TPOT for the other output tokens (no sample while the TPOT model is cold);
* errors, cut-off responses and responses without usage teach nothing.

It also records predicted against actual latencies and SLO violations for the metrics.
Parameter `predictorName` (default `latency-predictor`) names the predictor it feeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from epp import metrics, parameters
from epp.datastore.snapshot import EndpointKey
from epp.requestcontrol.interfaces import ResponseSummary
from epp.scheduling.interfaces import Candidate, SchedulingRequest, SchedulingResult
from epp.scheduling.plugins.prefix_producer import PrefixMatch
from epp.slo.features import UNCACHED
from epp.slo.model import Array
from epp.slo.predictor import LatencyPrediction, LatencyPredictor, Sample

PluginLookup = Callable[[str, type], object]


@dataclass(slots=True)
class _Tracked:
    """What the tracker remembers about one request (in its `plugin_data`)."""

    predictor: LatencyPredictor
    key: EndpointKey
    ttft_row: Array
    tpot_row: Array
    predicted_ttft_s: float | None
    predicted_tpot_s: float | None


class SloRequestTracker:
    type_name = "slo-request-tracker"

    def __init__(
        self, name: str = type_name, predictor_name: str = LatencyPredictor.type_name
    ) -> None:
        self.name = name
        self.predictor_name = predictor_name
        self.predictor: LatencyPredictor | None = None

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> SloRequestTracker:
        reader = parameters.ParameterReader(params)
        predictor = reader.string("predictorName", LatencyPredictor.type_name)
        reader.finish()
        return cls(name, predictor)

    def same_settings(self, other: object) -> bool:
        return type(other) is type(self) and other.predictor_name == self.predictor_name

    def bind(self, lookup: PluginLookup) -> None:
        """The loader hands over the predictor this tracker feeds."""
        predictor = lookup(self.predictor_name, LatencyPredictor)
        assert isinstance(predictor, LatencyPredictor)
        self.predictor = predictor

    def pre_request(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        predictor = self.predictor
        primary = result.primary
        if predictor is None or primary is None or not primary.targets:
            return
        target: Candidate = primary.targets[0]
        key = target.endpoint.key
        prediction = request.plugin_data.get(predictor.name)
        row = prediction.row_of(key) if isinstance(prediction, LatencyPrediction) else None
        if isinstance(prediction, LatencyPrediction) and row is not None:
            ttft_row, tpot_row = prediction.ttft_rows[row], prediction.tpot_rows[row]
            warm = prediction.warm
            predicted = (float(prediction.ttft_s[row]), float(prediction.tpot_s[row]))
        else:  # this request's profile did not predict: take the features now
            ttft_row, tpot_row = predictor.features_for(request, target)
            warm, predicted = False, (predictor.predict_ttft(key, ttft_row), 0.0)
        uncached = int(ttft_row[UNCACHED] * 1000)
        match = request.plugin_data.get(predictor.settings.prefix_producer)
        hashes = match.hashes if isinstance(match, PrefixMatch) else ()
        # Until its predicted first token, its prefill is work ahead of later requests.
        predictor.in_flight.add(key, id(request), uncached, time.monotonic() + predicted[0], hashes)
        request.plugin_data[self.name] = _Tracked(
            predictor,
            key,
            ttft_row,
            tpot_row,
            predicted[0] if warm else None,
            predicted[1] if warm else None,
        )

    def response_complete(
        self, request: SchedulingRequest, target: Candidate, response: ResponseSummary
    ) -> None:
        tracked = request.plugin_data.pop(self.name, None)
        if not isinstance(tracked, _Tracked):
            return
        predictor = tracked.predictor
        predictor.in_flight.remove(tracked.key, id(request))
        if not (response.completed and 200 <= response.status < 300):
            return
        ttft, tpot = _measured(response, predictor, tracked)
        if ttft is None and tpot is None:
            return
        predictor.observe(
            Sample(
                tracked.key,
                tracked.ttft_row if ttft is not None else None,
                ttft or 0.0,
                tracked.tpot_row if tpot is not None else None,
                tpot or 0.0,
            )
        )
        _record(request, tracked, ttft, tpot)


def _measured(
    response: ResponseSummary, predictor: LatencyPredictor, tracked: _Tracked
) -> tuple[float | None, float | None]:
    if response.ttft_s is None:
        return None, None
    if response.streaming:
        return response.ttft_s, response.tpot_s
    usage = response.usage
    output = usage.output_tokens if usage is not None else 0
    if output <= 1:
        return response.ttft_s, None
    per_token = predictor.predict_tpot(tracked.key, tracked.tpot_row)
    if per_token is None:
        return None, None
    return max(response.ttft_s - per_token * (output - 1), 0.0), None


def _record(
    request: SchedulingRequest, tracked: _Tracked, ttft: float | None, tpot: float | None
) -> None:
    slo = request.slo
    if ttft is not None:
        metrics.latency_actual_ttft_seconds.observe(ttft)
        if tracked.predicted_ttft_s is not None:
            metrics.latency_predicted_ttft_seconds.observe(tracked.predicted_ttft_s)
        if slo is not None and slo.ttft_ms is not None and ttft * 1000 > slo.ttft_ms:
            metrics.slo_violations_total.labels("ttft").inc()
    if tpot is not None:
        metrics.latency_actual_tpot_seconds.observe(tpot)
        if tracked.predicted_tpot_s is not None:
            metrics.latency_predicted_tpot_seconds.observe(tracked.predicted_tpot_s)
        if slo is not None and slo.tpot_ms is not None and tpot * 1000 > slo.tpot_ms:
            metrics.slo_violations_total.labels("tpot").inc()
