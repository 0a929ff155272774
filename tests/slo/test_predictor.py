"""The latency model and predictor: learning a heterogeneous pool, cold start, swaps."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from epp.config.loader import load_config
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import SloTargets
from epp.scheduling.interfaces import Candidate, SchedulingRequest
from epp.slo import features
from epp.slo.model import SufficientStatistics
from epp.slo.predictor import LatencyPrediction, LatencyPredictor, PredictorSettings, Sample
from tests.scheduling.builders import endpoint

SPEED = {"fast": 1.0, "slow": 3.0}  # seconds per unit of work: slow is 3x slower


def true_ttft(name: str, uncached_k: float, queued: int) -> float:
    """A pool where each queued request costs 50 ms and each 1k uncached tokens 200 ms,
    times the server's slowness."""
    return SPEED[name] * (0.02 + 0.2 * uncached_k + 0.05 * queued)


def candidate(name: str, queued: int, running: int = 0) -> Candidate:
    return Candidate(
        endpoint(name),
        EndpointMetrics(waiting_queue_size=queued, running_requests=running, updated_at=1.0),
    )


def request(tokens: int, slo: SloTargets | None = None) -> SchedulingRequest:
    return SchedulingRequest("r", "m", prompt_text="x" * (tokens * 4), slo=slo)


def test_per_endpoint_models_learn_a_heterogeneous_pool() -> None:
    rng = random.Random(3)
    stats = SufficientStatistics(len(features.TTFT_FEATURES), decay=1.0)
    for name in SPEED:
        rows, targets = [], []
        for _ in range(300):
            uncached, queued = rng.uniform(0, 4), rng.randrange(0, 8)
            rows.append([1.0, uncached, 0.0, queued, 0])
            targets.append(true_ttft(name, uncached, queued))
        stats.add(endpoint(name).key, np.array(rows), np.array(targets))
    model = stats.solve()
    probe = np.array([[1.0, 2.0, 0.0, 4, 0]] * 2)
    fast, slow = model.predict([endpoint("fast").key, endpoint("slow").key], probe)
    assert fast == pytest.approx(true_ttft("fast", 2.0, 4), rel=0.02)
    assert slow == pytest.approx(true_ttft("slow", 2.0, 4), rel=0.02)
    # An endpoint never seen gets the pool's model: between the two.
    [new] = model.predict([endpoint("new").key], probe[:1])
    assert fast < new < slow


def test_an_endpoint_with_few_samples_of_one_kind_borrows_the_pools_shape_at_its_speed() -> None:
    """A slow endpoint the picker has sent only a handful of short, cached requests: its own
    samples cannot tell a fixed cost from a per-token one. It borrows the pool's shape at
    its own speed (learned from those samples), not the pool's coefficients as they are: its
    short requests are predicted as measured, and a long prefill at 3x a fast server's."""
    rng = random.Random(5)
    stats = SufficientStatistics(len(features.TTFT_FEATURES), decay=1.0)
    rows, targets = [], []
    for _ in range(400):  # the fast server sees everything
        uncached, queued = rng.uniform(0, 4), rng.randrange(0, 8)
        rows.append([1.0, uncached, 0.0, queued, 0])
        targets.append(true_ttft("fast", uncached, queued))
    stats.add(endpoint("fast").key, np.array(rows), np.array(targets))
    short = [[1.0, 0.05, 0.0, 0, 0]] * 12  # the slow one: cached turns, never a queue
    stats.add(endpoint("slow").key, np.array(short), np.full(12, true_ttft("slow", 0.05, 0)))
    model = stats.solve()
    probe = np.array([[1.0, 0.05, 0.0, 0, 0], [1.0, 3.0, 0.0, 2, 0]])
    turn, long_prefill = model.predict([endpoint("slow").key] * 2, probe)
    assert turn == pytest.approx(true_ttft("slow", 0.05, 0), rel=0.1)
    assert long_prefill == pytest.approx(true_ttft("slow", 3.0, 2), rel=0.15)
    # Shrunk to the pool's coefficients as they are (the fast server's here), the long
    # prefill would be predicted at under half of what it costs.
    unscaled = stats.solve(scaled_prior=False)
    [long_unscaled] = unscaled.predict([endpoint("slow").key], probe[1:])
    assert long_unscaled < 0.5 * true_ttft("slow", 3.0, 2)


def _teach(predictor: LatencyPredictor, samples: int, rng: random.Random) -> None:
    """Route requests through `produce`, then feed back what the 'server' measured."""
    for _ in range(samples):
        name = rng.choice(list(SPEED))
        queued, tokens = rng.randrange(0, 6), rng.randrange(100, 3000)
        req = request(tokens)
        predictor.produce(req, [candidate(name, queued)])
        prediction = req.plugin_data[predictor.name]
        assert isinstance(prediction, LatencyPrediction)
        ttft = true_ttft(name, tokens / 1000, queued) * rng.uniform(0.95, 1.05)
        tpot = 0.01 * SPEED[name]
        predictor.observe(
            Sample(endpoint(name).key, prediction.ttft_rows[0], ttft, prediction.tpot_rows[0], tpot)
        )


def test_cold_until_min_samples_then_accurate_on_held_out_requests() -> None:
    """The bound the issue asks for: after 300 requests (150 per server) the predictor's
    mean absolute percentage error on held-out requests is under 10%."""
    predictor = LatencyPredictor(settings=PredictorSettings(min_samples=100))
    rng = random.Random(7)
    assert not predictor.warm
    _teach(predictor, 99, rng)
    predictor.train_now()
    assert not predictor.warm  # 99 < minSamples
    _teach(predictor, 201, rng)
    predictor.train_now()
    assert predictor.warm and predictor.samples == 300
    errors = []
    for _ in range(200):
        name = rng.choice(list(SPEED))
        queued, tokens = rng.randrange(0, 6), rng.randrange(100, 3000)
        req = request(tokens)
        predictor.produce(req, [candidate(name, queued)])
        predicted = float(req.plugin_data[predictor.name].ttft_s[0])  # type: ignore[attr-defined]
        actual = true_ttft(name, tokens / 1000, queued)
        errors.append(abs(predicted - actual) / actual)
    assert sum(errors) / len(errors) < 0.10


def test_predictions_stay_whole_while_a_new_model_is_trained() -> None:
    """Predictions on the loop run while the trainer thread swaps models: each prediction
    uses one whole model (finite, positive), and nothing raises."""
    predictor = LatencyPredictor(settings=PredictorSettings(min_samples=10))
    rng = random.Random(1)
    _teach(predictor, 50, rng)
    predictor.train_now()
    stop = threading.Event()
    failures: list[BaseException] = []

    def train() -> None:
        local = random.Random(2)
        try:
            while not stop.is_set():
                _teach(predictor, 20, local)
                predictor.train_now()
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=train)
    thread.start()
    try:
        cands = [candidate("fast", 2), candidate("slow", 2)]
        for _ in range(2000):
            req = request(500)
            predictor.produce(req, cands)
            prediction = req.plugin_data[predictor.name]
            assert isinstance(prediction, LatencyPrediction)
            assert np.all(np.isfinite(prediction.ttft_s)) and np.all(prediction.ttft_s > 0)
    finally:
        stop.set()
        thread.join()
    assert not failures
    assert predictor.trainings > 1


def test_reload_keeps_the_trained_model() -> None:
    text = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: latency-predictor, parameters: {minSamples: 10}}
- {type: latency-scorer}
- {type: slo-request-tracker}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: latency-scorer}]
"""
    old = load_config(text)
    predictor = old.plugins["latency-predictor"]
    assert isinstance(predictor, LatencyPredictor)
    _teach(predictor, 30, random.Random(4))
    predictor.train_now()
    assert predictor.warm
    new = load_config(
        text.replace(
            "{type: latency-scorer}",
            "{type: latency-scorer, parameters: {countOutputTokens: false}}",
        ),
        previous=old,
    )
    assert new.plugins["latency-predictor"] is predictor
    tracker = new.plugins["slo-request-tracker"]
    assert tracker.predictor is predictor  # type: ignore[attr-defined]
    changed = load_config(text.replace("minSamples: 10", "minSamples: 20"), previous=old)
    assert changed.plugins["latency-predictor"] is not predictor


def test_the_profile_runs_the_prefix_producer_before_the_predictor() -> None:
    config = load_config(
        """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins: [{type: latency-scorer}]
"""
    )
    producers = [p.name for p in config.scheduler.profiles["default"].producers]
    assert producers == ["approx-prefix-cache-producer", "latency-predictor"]
