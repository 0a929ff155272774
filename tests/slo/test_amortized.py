"""Amortized cache misses: a hot prefix whose holder queues gets a second holder."""

from __future__ import annotations

import random

import numpy as np
import pytest

from epp.requestcontrol.interfaces import ResponseSummary
from epp.scheduling.interfaces import Candidate, ProfileResult, SchedulingRequest, SchedulingResult
from epp.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer
from epp.slo.predictor import LatencyPrediction, LatencyPredictor, PredictorSettings, amortized_ttft
from epp.slo.scorers import LatencyScorer
from epp.slo.tracker import SloRequestTracker
from tests.slo.test_predictor import _teach, candidate

PREFIX = "system prompt shared by a group of requests " * 180  # ~2,000 tokens


def test_amortized_ttft_shares_only_the_extra_prefill() -> None:
    ttft = np.array([0.6, 0.9, 0.3])
    if_cached = np.array([0.6, 0.1, 0.3])  # the first and last hold the prefix already
    assert amortized_ttft(ttft, if_cached, 0) == pytest.approx(ttft)
    # Three requests in flight share the prefix: a miss's 0.8 s extra counts a quarter.
    assert amortized_ttft(ttft, if_cached, 3) == pytest.approx([0.6, 0.1 + 0.8 / 4, 0.3])


def _trained() -> tuple[LatencyPredictor, ApproxPrefixCacheProducer, SloRequestTracker]:
    predictor = LatencyPredictor(settings=PredictorSettings(min_samples=50))
    _teach(predictor, 400, random.Random(5))
    predictor.train_now()
    assert predictor.warm
    tracker = SloRequestTracker()
    tracker.bind(lambda name, kind: predictor)
    return predictor, ApproxPrefixCacheProducer(), tracker


def _route(
    predictor: LatencyPredictor,
    producer: ApproxPrefixCacheProducer,
    question: int,
    cands: list[Candidate],
) -> tuple[SchedulingRequest, LatencyPrediction]:
    req = SchedulingRequest(f"r{question}", "m", prompt_text=f"{PREFIX}\nquestion {question}")
    producer.produce(req, cands)
    predictor.produce(req, cands)
    prediction = req.plugin_data[predictor.name]
    assert isinstance(prediction, LatencyPrediction)
    return req, prediction


def _send(
    req: SchedulingRequest,
    target: Candidate,
    producer: ApproxPrefixCacheProducer,
    tracker: SloRequestTracker,
) -> None:
    result = SchedulingResult({"p": ProfileResult((target,))}, "p")
    producer.pre_request(req, result)
    tracker.pre_request(req, result)


def test_a_queued_holder_of_a_shared_prefix_loses_to_an_idle_endpoint() -> None:
    predictor, producer, tracker = _trained()
    holder, idle = candidate("holder", queued=0), candidate("idle", queued=0)
    first, _ = _route(predictor, producer, 0, [holder, idle])
    _send(first, holder, producer, tracker)  # the holder now has the prefix

    # Its queue grows, and requests with the same prefix are in flight there.
    holder = candidate("holder", queued=6)
    sent = [first]
    for question in range(1, 5):
        req, _ = _route(predictor, producer, question, [holder, idle])
        _send(req, holder, producer, tracker)
        sent.append(req)

    req, prediction = _route(predictor, producer, 9, [holder, idle])
    plain = LatencyScorer(count_output_tokens=False, amortize_misses=False)
    amortized = LatencyScorer(count_output_tokens=False)
    # Alone, this request would rather queue at the holder than pay the whole prefill ...
    queued_ttft, miss_ttft = prediction.ttft_s
    assert queued_ttft < miss_ttft
    holder_score, idle_score = plain.score(req, [holder, idle])
    assert holder_score > idle_score
    # ... but the copy serves the five in flight with it: the idle endpoint wins.
    holder_score, idle_score = amortized.score(req, [holder, idle])
    assert idle_score > holder_score
    # The SLO scorer's prediction stays this request's own (the whole miss).
    assert prediction.ttft_s[1] == miss_ttft

    # When they end, nothing is shared any more and a miss costs its whole prefill again.
    done = ResponseSummary(200, True, True, None, 0.1, None, 0.2)
    for r in sent:
        tracker.response_complete(r, holder, done)
    assert predictor.in_flight.is_empty()
    req, prediction = _route(predictor, producer, 10, [holder, idle])
    assert prediction.ttft_amortized_s == pytest.approx(prediction.ttft_s)


def test_no_shared_prefix_no_change() -> None:
    predictor, producer, tracker = _trained()
    cands = [candidate("a", queued=3), candidate("b", queued=0)]
    for question in range(3):  # in flight, but no endpoint holds their prompt
        req = SchedulingRequest(f"u{question}", "m", prompt_text=f"unique {question} " * 500)
        producer.produce(req, cands)
        predictor.produce(req, cands)
        tracker.pre_request(req, SchedulingResult({"p": ProfileResult((cands[0],))}, "p"))
    _, prediction = _route(predictor, producer, 1, cands)
    assert prediction.ttft_amortized_s is prediction.ttft_s
