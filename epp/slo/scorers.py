"""Scorers over the latency predictor's predictions.

`latency-scorer` (any request): predicted latency = TTFT + TPOT x the request's output
tokens (`max_tokens`, when the request gives it and `countOutputTokens` is true); the
fastest candidate scores 1 and every other one fastest/its own, so a candidate twice as
slow scores 0.5. Prefix affinity is inside the prediction (uncached tokens cost prefill
time), weighed against the queueing it would cause, not by a fixed weight. With
`amortizeMisses` (default true) the extra prefill of a cache miss counts shared among the
requests in flight with the same prefix (`predictor.amortized_ttft`): one request alone
would always rather queue at a holder than pay a whole prefill elsewhere, which leaves a
hot prefix on one endpoint however long its queue (TTFT p90 at the cost of a miss); the
new copy serves that queue's followers.

`slo-scorer` (requests with latency objectives; the others score 0 everywhere): headroom
= objective - prediction, for TTFT and TPOT, relative to the objective, less
`safetyMargin` (default 0: a candidate predicted to need 80% of the objective has headroom
0.2, with margin 0.3 it misses). Candidates that meet every objective score 0.2-1;
candidates that miss score at most 0.01, the least-bad highest, so when every candidate
misses the one closest to meeting it wins. Among those that meet, `headroom: most`
(default) scores more room higher; `headroom: least` scores the least room highest — it
packs a request with a loose objective where it still meets it and leaves the endpoints
with room to spare to requests with tight ones (use it with a margin: a prediction is off
by 20-40%).

Both read `request.plugin_data[<predictor>]` (parameter `predictorName`, default
`latency-predictor`; the loader puts the predictor in the profile). While the predictor
is cold they score as the default profile would — 2 x queue + 2 x KV cache + 3 x prefix,
over 7 — and count that in `inference_extension_latency_fallback_total{plugin}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from epp import metrics, parameters
from epp.scheduling.interfaces import Candidate, SchedulingRequest
from epp.scheduling.plugins import load_scorers, prefix_scorer
from epp.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer
from epp.slo.predictor import LatencyPrediction, LatencyPredictor

MEETS_FLOOR = 0.2  # every candidate that meets the objectives scores at least this
MISS_CEILING = 0.01  # and every one that misses at most this (but more than 0)


def composite_scores(
    request: SchedulingRequest, candidates: Sequence[Candidate], prefix_producer: str
) -> list[float]:
    """The default profile's blend, for a cold predictor."""
    queue = load_scorers.QueueScorer().score(request, candidates)
    kv = load_scorers.KvCacheUtilizationScorer().score(request, candidates)
    prefix = prefix_scorer.PrefixCacheScorer(producer_name=prefix_producer).score(
        request, candidates
    )
    return [(2 * q + 2 * k + 3 * p) / 7 for q, k, p in zip(queue, kv, prefix, strict=True)]


class _PredictionScorer:
    type_name = ""

    def __init__(self, name: str, predictor_name: str) -> None:
        self.name = name
        self.required_producer = predictor_name  # the loader wires it into the profile
        self._fallback = metrics.latency_fallback_total.labels(name)

    def _prediction(self, request: SchedulingRequest) -> LatencyPrediction | None:
        prediction = request.plugin_data.get(self.required_producer)
        if isinstance(prediction, LatencyPrediction) and prediction.warm:
            return prediction
        return None

    def _fallback_scores(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> list[float]:
        self._fallback.inc()
        prediction = request.plugin_data.get(self.required_producer)
        prefix = (
            prediction.predictor.settings.prefix_producer
            if isinstance(prediction, LatencyPrediction)
            else ApproxPrefixCacheProducer.type_name
        )
        return composite_scores(request, candidates, prefix)


class LatencyScorer(_PredictionScorer):
    type_name = "latency-scorer"

    def __init__(
        self,
        name: str = type_name,
        predictor_name: str = LatencyPredictor.type_name,
        *,
        count_output_tokens: bool = True,
        amortize_misses: bool = True,
    ) -> None:
        super().__init__(name, predictor_name)
        self.count_output_tokens = count_output_tokens
        self.amortize_misses = amortize_misses

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> LatencyScorer:
        reader = parameters.ParameterReader(params)
        predictor = reader.string("predictorName", LatencyPredictor.type_name)
        count_output = reader.boolean("countOutputTokens", True)
        amortize = reader.boolean("amortizeMisses", True)
        reader.finish()
        return cls(name, predictor, count_output_tokens=count_output, amortize_misses=amortize)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        prediction = self._prediction(request)
        if prediction is None:
            return self._fallback_scores(request, candidates)
        latency, tpot = prediction.for_candidates(candidates)
        if self.amortize_misses:
            latency = prediction.amortized_for(candidates)
        if self.count_output_tokens and request.max_output_tokens > 1:
            latency = latency + tpot * (request.max_output_tokens - 1)
        scores = float(latency.min()) / latency
        return [0.0 if c.stale else float(s) for c, s in zip(candidates, scores, strict=True)]


class SloScorer(_PredictionScorer):
    type_name = "slo-scorer"

    def __init__(
        self,
        name: str = type_name,
        predictor_name: str = LatencyPredictor.type_name,
        *,
        prefer_least_headroom: bool = False,
        safety_margin: float = 0.0,
    ) -> None:
        super().__init__(name, predictor_name)
        self.prefer_least_headroom = prefer_least_headroom
        self.safety_margin = safety_margin

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> SloScorer:
        reader = parameters.ParameterReader(params)
        predictor = reader.string("predictorName", LatencyPredictor.type_name)
        headroom = reader.string("headroom", "most")
        if headroom not in ("most", "least"):
            raise parameters.ParameterError("headroom", f"is {headroom!r}; 'most' or 'least'")
        margin = reader.number("safetyMargin", 0.0, minimum=0.0)
        if margin >= 1.0:
            raise parameters.ParameterError("safetyMargin", "must be below 1 (a fraction)")
        reader.finish()
        return cls(name, predictor, prefer_least_headroom=headroom == "least", safety_margin=margin)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        slo = request.slo
        if slo is None or (slo.ttft_ms is None and slo.tpot_ms is None):
            return [0.0] * len(candidates)
        prediction = self._prediction(request)
        if prediction is None:
            return self._fallback_scores(request, candidates)
        ttft, tpot = prediction.for_candidates(candidates)
        # Relative headroom per objective; the request's is the tighter one.
        headroom = np.full(len(candidates), np.inf)
        if slo.ttft_ms is not None:
            target = slo.ttft_ms / 1000
            headroom = np.minimum(headroom, (target - ttft) / target)
        if slo.tpot_ms is not None:
            target = slo.tpot_ms / 1000
            headroom = np.minimum(headroom, (target - tpot) / target)
        scores = headroom_scores(headroom - self.safety_margin, self.prefer_least_headroom)
        return [0.0 if c.stale else float(s) for c, s in zip(candidates, scores, strict=True)]


def headroom_scores(headroom: np.ndarray, prefer_least: bool = False) -> np.ndarray:
    """Scores from relative headroom (>= 0: meets the objectives)."""
    scores = np.empty(len(headroom))
    meets = headroom >= 0
    if meets.any():
        room = headroom[meets]
        best = float(room.max())
        if prefer_least:
            least = float(room.min())
            share = (best - room) / (best - least) if best > least else np.ones(len(room))
        else:
            share = room / best if best > 0 else np.ones(len(room))
        scores[meets] = MEETS_FLOOR + (1 - MEETS_FLOOR) * share
    misses = ~meets
    if misses.any():
        deficit = -headroom[misses]
        worst = float(deficit.max())
        # In (0, MISS_CEILING]: the smallest deficit gets the most.
        scores[misses] = MISS_CEILING * (1.0 - 0.9 * (deficit / worst))
    return scores
