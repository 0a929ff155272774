"""SLO scorers, the profile handler, the request tracker and request objectives."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp import metrics
from epp.bodies.usage import Usage
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import SloTargets, Snapshot, WorkloadClass
from epp.flowcontrol.interfaces import QueueItem
from epp.flowcontrol.ordering import SloDeadlineOrderingPolicy
from epp.flowcontrol.registry import WorkloadRegistry
from epp.flowcontrol.workload import WorkloadId
from epp.requestcontrol import objectives
from epp.requestcontrol.interfaces import ResponseSummary
from epp.scheduling.interfaces import Candidate, ProfileResult, SchedulingRequest, SchedulingResult
from epp.slo.predictor import LatencyPrediction, LatencyPredictor, PredictorSettings
from epp.slo.profile_handler import SloProfileHandler
from epp.slo.scorers import LatencyScorer, SloScorer, headroom_scores
from epp.slo.tracker import SloRequestTracker
from tests.scheduling.builders import endpoint


def candidates(*queues: int) -> list[Candidate]:
    return [
        Candidate(endpoint(f"e{i}"), EndpointMetrics(waiting_queue_size=q, updated_at=1.0))
        for i, q in enumerate(queues)
    ]


def predicted(
    request: SchedulingRequest, cands: list[Candidate], ttft: list[float], tpot: list[float]
) -> LatencyPredictor:
    """Put a warm prediction in the request, as the predictor would."""
    predictor = LatencyPredictor()
    rows = np.zeros((len(cands), 5))
    request.plugin_data[predictor.name] = LatencyPrediction(
        predictor,
        [c.endpoint.key for c in cands],
        rows,
        np.zeros((len(cands), 3)),
        np.array(ttft),
        np.array(tpot),
        warm=True,
    )
    return predictor


def slo_request(ttft_ms: float | None = None, tpot_ms: float | None = None) -> SchedulingRequest:
    slo = SloTargets(ttft_ms, tpot_ms) if ttft_ms or tpot_ms else None
    return SchedulingRequest("r", "m", slo=slo)


# ---- scorers ---------------------------------------------------------------------------


def test_latency_scorer_scores_fastest_over_own() -> None:
    cands = candidates(0, 0, 0)
    req = SchedulingRequest("r", "m", max_output_tokens=11)
    predicted(req, cands, ttft=[0.1, 0.2, 0.1], tpot=[0.01, 0.01, 0.02])
    # latency = ttft + 10 x tpot: 0.2, 0.3, 0.3
    assert LatencyScorer().score(req, cands) == pytest.approx([1.0, 2 / 3, 2 / 3])
    ttft_only = LatencyScorer(count_output_tokens=False)
    assert ttft_only.score(req, cands) == pytest.approx([1.0, 0.5, 1.0])


def test_scorers_score_the_candidates_a_filter_left() -> None:
    """Producers predict for every candidate; a filter after them (the saturation filter
    with flow control) may drop some before the scorers run."""
    cands = candidates(0, 0, 0)
    req = SchedulingRequest("r", "m", slo=SloTargets(200, None))
    predicted(req, cands, ttft=[0.05, 0.3, 0.1], tpot=[0.01, 0.01, 0.01])
    left = [cands[2], cands[1]]  # filtered and in another order
    assert LatencyScorer(count_output_tokens=False).score(req, left) == pytest.approx([1.0, 1 / 3])
    meets, misses = SloScorer().score(req, left)
    assert meets > 0.2 and 0 < misses <= 0.01


def test_slo_scorer_skips_requests_without_objectives() -> None:
    cands = candidates(0, 0)
    req = slo_request()
    predicted(req, cands, ttft=[0.1, 0.5], tpot=[0.01, 0.01])
    assert SloScorer().score(req, cands) == [0.0, 0.0]


def test_slo_scorer_meeting_candidates_by_headroom_and_missing_ones_barely() -> None:
    cands = candidates(0, 0, 0)
    req = slo_request(ttft_ms=200)
    predicted(req, cands, ttft=[0.05, 0.15, 0.4], tpot=[0.01, 0.01, 0.01])
    meets_more, meets_less, misses = SloScorer().score(req, cands)
    assert meets_more == pytest.approx(1.0)
    assert 0.2 <= meets_less < meets_more
    assert 0 < misses <= 0.01


def test_slo_scorer_when_every_candidate_misses_the_least_bad_wins() -> None:
    cands = candidates(0, 0, 0)
    req = slo_request(ttft_ms=100, tpot_ms=20)
    predicted(req, cands, ttft=[0.3, 0.15, 0.2], tpot=[0.01, 0.01, 0.05])
    scores = SloScorer().score(req, cands)
    assert all(0 < s <= 0.01 for s in scores)
    assert max(range(3), key=scores.__getitem__) == 1  # 50% over vs 150%, 150%/200%


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=20))
def test_headroom_scores_keep_meeting_above_missing(headroom: list[float]) -> None:
    scores = headroom_scores(np.array(headroom))
    for h, s in zip(headroom, scores, strict=True):
        assert (0.2 <= s <= 1.0) if h >= 0 else (0 < s <= 0.01)
    order = sorted(range(len(headroom)), key=lambda i: headroom[i])
    assert all(scores[a] <= scores[b] + 1e-12 for a, b in itertools.pairwise(order))


def test_cold_predictor_falls_back_to_the_default_blend_and_says_so() -> None:
    cands = candidates(4, 0)
    req = slo_request(ttft_ms=100)
    predictor = LatencyPredictor(settings=PredictorSettings(min_samples=5))
    predictor.produce(req, cands)  # cold: a prediction, marked not warm
    before = (
        metrics.REGISTRY.get_sample_value(
            "inference_extension_latency_fallback_total", {"plugin": "slo-scorer"}
        )
        or 0
    )
    busy, idle = SloScorer().score(req, cands)
    assert idle > busy  # the queue decides, as in the default profile
    after = metrics.REGISTRY.get_sample_value(
        "inference_extension_latency_fallback_total", {"plugin": "slo-scorer"}
    )
    assert after == before + 1


# ---- profile handler ---------------------------------------------------------------------


def test_profile_handler_runs_the_slo_profile_for_slo_requests_when_warm() -> None:
    handler = SloProfileHandler()
    predictor = LatencyPredictor(settings=PredictorSettings(min_samples=1))
    handler.bind(lambda name, kind: predictor)
    profiles = {"default": object(), "slo-aware": object()}
    with_slo, without = slo_request(ttft_ms=100), slo_request()
    assert handler.pick_profiles(with_slo, profiles, {}) == ["default"]  # cold predictor
    predictor._ttft = predictor._ttft.__class__(predictor._ttft.pooled, {}, samples=1)
    assert handler.pick_profiles(with_slo, profiles, {}) == ["slo-aware"]
    assert handler.pick_profiles(without, profiles, {}) == ["default"]
    assert handler.pick_profiles(with_slo, profiles, {"slo-aware": None}) == []
    with pytest.raises(ValueError, match="did you mean 'slo-aware'"):
        SloProfileHandler(slo_profile="slo-awar").check_profiles(["default", "slo-aware"])


# ---- request objectives ------------------------------------------------------------------


def _snapshot(*classes: WorkloadClass) -> Snapshot:
    return Snapshot(workload_classes={c.workload_id: c for c in classes})


def test_objectives_from_headers_then_the_workload_class() -> None:
    fraud = WorkloadClass("fraud", "ns", "fraud", slo=SloTargets(ttft_ms=300))
    snap = _snapshot(fraud)
    header = '{"workload_id": "fraud", "criticality": 4}'
    read = objectives.read
    assert read({"x-slo-ttft-ms": "150"}, snap, 3).slo == SloTargets(150.0, None)
    assert read({"x-llm-d-slo-tpot-ms": "20"}, snap, 3).slo == SloTargets(None, 20.0)
    assert read({"x-workload-context": header}, snap, 3).slo == SloTargets(300, None)
    assert read({}, snap, 3).slo is None


@pytest.mark.parametrize("value", ["soon", "-5", "0", "nan", "inf", "1e12"])
def test_malformed_slo_headers_are_absent_and_counted(value: str) -> None:
    def count() -> float:
        return (
            metrics.REGISTRY.get_sample_value(
                "inference_extension_slo_header_invalid_total", {"header": "x-slo-ttft-ms"}
            )
            or 0.0
        )

    before = count()
    assert objectives.read({"x-slo-ttft-ms": value}, Snapshot(), 3).slo is None
    assert count() == before + 1


# ---- the tracker on every path -------------------------------------------------------------


# No training round during these tests: one would drain the buffer they inspect.
UNTRAINED = PredictorSettings(min_samples=1, retrain_interval_s=1e9, retrain_samples=10**6)


def _route(
    tracker: SloRequestTracker, predictor: LatencyPredictor, name: str, i: int
) -> tuple[SchedulingRequest, Candidate]:
    req = SchedulingRequest(f"r{i}", "m", prompt_text="x" * 400)
    cands = candidates(0, 1, 2)
    predictor.produce(req, cands)
    chosen = cands[int(name[1])]
    tracker.pre_request(req, SchedulingResult({"p": ProfileResult((chosen,))}, "p"))
    return req, chosen


ENDINGS = {
    "ok-streamed": ResponseSummary(200, True, True, Usage(10, 20), 0.1, 0.01, 0.4),
    "ok-json": ResponseSummary(200, False, True, Usage(10, 20), 0.5, None, 0.5),
    "upstream-error": ResponseSummary(500, False, True, None, 0.01, None, 0.01),
    "client-gone": ResponseSummary(200, True, False, None, 0.1, None, 0.2),
    "no-response": ResponseSummary(0, False, False, None, None, None, 5.0),
}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["e0", "e1", "e2"]), st.sampled_from(sorted(ENDINGS))),
        max_size=40,
    ),
    st.randoms(use_true_random=False),
)
def test_tracker_leaves_nothing_in_flight_whatever_the_interleaving(
    plan: list[tuple[str, str]], rng: random.Random
) -> None:
    predictor = LatencyPredictor(settings=UNTRAINED)
    tracker = SloRequestTracker()
    tracker.bind(lambda name, kind: predictor)
    started = [
        (*_route(tracker, predictor, name, i), ending) for i, (name, ending) in enumerate(plan)
    ]
    assert predictor.in_flight.total() == len(plan)
    rng.shuffle(started)  # requests end in any order
    for req, chosen, ending in started:
        tracker.response_complete(req, chosen, ENDINGS[ending])
    assert predictor.in_flight.is_empty()
    if any(ending == "ok-streamed" for _, ending in plan):
        assert predictor.buffered  # what measured its latency became a sample


def test_tracker_learns_only_from_complete_successful_responses() -> None:
    predictor = LatencyPredictor(settings=UNTRAINED)
    tracker = SloRequestTracker()
    tracker.bind(lambda name, kind: predictor)
    for i, ending in enumerate(["upstream-error", "client-gone", "no-response", "ok-json"]):
        req, chosen = _route(tracker, predictor, "e1", i)
        tracker.response_complete(req, chosen, ENDINGS[ending])
    assert predictor.buffered == []  # ok-json needs a warm TPOT model to derive TTFT
    req, chosen = _route(tracker, predictor, "e1", 9)
    tracker.response_complete(req, chosen, ENDINGS["ok-streamed"])
    [sample] = predictor.buffered
    assert sample.ttft_s == 0.1 and sample.tpot_s == 0.01


# ---- SLO deadline ordering ---------------------------------------------------------------


def _slo_item(seq: int, slo_deadline: float) -> QueueItem:
    return QueueItem(
        request_id=str(seq),
        workload_id=WorkloadId("w"),
        criticality=3,
        fairness_id="f",
        priority=0,
        size_bytes=0,
        enqueued_at=0.0,
        deadline=math.inf,
        seq=seq,
        slo_deadline=slo_deadline,
    )


def test_slo_deadline_policy_serves_the_tightest_objective_first() -> None:
    queue = SloDeadlineOrderingPolicy().new_queue(WorkloadRegistry())
    items = [_slo_item(1, math.inf), _slo_item(2, 5.0), _slo_item(3, 1.0), _slo_item(4, math.inf)]
    for i in items:
        queue.push(i, 0.0)
    assert [queue.pop(0.0) for _ in range(4)] == [items[2], items[1], items[0], items[3]]


def test_slo_deadline_policy_serves_objectives_already_missed_after_those_in_reach() -> None:
    """At t=10 the objectives of 1 and 2 have passed: 3 and 4 can still be met and go
    first; then the late ones, oldest first, still ahead of 5, which has no objective."""
    queue = SloDeadlineOrderingPolicy().new_queue(WorkloadRegistry())
    late_new, late_old = _slo_item(2, 5.0), _slo_item(1, 8.0)
    reach_soon, reach_later, none = _slo_item(4, 11.0), _slo_item(3, 12.0), _slo_item(5, math.inf)
    for i in (late_old, late_new, reach_later, reach_soon, none):
        queue.push(i, 0.0)
    popped = [queue.pop(10.0) for _ in range(5)]
    assert popped == [reach_soon, reach_later, late_old, late_new, none]
    assert queue.pop(10.0) is None and len(queue) == 0


@given(
    st.lists(
        st.tuples(st.one_of(st.floats(0, 20), st.just(math.inf)), st.booleans()),
        max_size=40,
    ),
    st.floats(0, 20),
)
def test_slo_deadline_queue_serves_each_live_item_once_in_order(
    entries: list[tuple[float, bool]], now: float
) -> None:
    """Whatever the deadlines and removals: every item not removed comes out exactly once,
    the count stays right, in-reach objectives first (earliest deadline first), then the
    late ones (oldest first), then those without one (oldest first)."""
    queue = SloDeadlineOrderingPolicy().new_queue(WorkloadRegistry())
    items = [_slo_item(seq, deadline) for seq, (deadline, _) in enumerate(entries)]
    for i in items:
        queue.push(i, 0.0)
    for i, (_, removed) in zip(items, entries, strict=True):
        if removed:
            queue.remove(i)
    live = [i for i, (_, removed) in zip(items, entries, strict=True) if not removed]
    assert len(queue) == len(live)
    popped = []
    while (next_item := queue.pop(now)) is not None:
        popped.append(next_item)
    in_reach = sorted(
        (i for i in live if now <= i.slo_deadline < math.inf), key=lambda i: (i.slo_deadline, i.seq)
    )
    late = [i for i in live if i.slo_deadline < now]
    without = [i for i in live if i.slo_deadline == math.inf]
    assert popped == in_reach + late + without
    assert len(queue) == 0


def test_slo_scorer_packing_leaves_the_roomiest_endpoint_to_tight_objectives() -> None:
    """headroom: least sends a loose objective where it still meets it with the margin;
    the margin turns "barely meets" into a miss."""
    cands = candidates(0, 0, 0)
    req = slo_request(ttft_ms=1000)
    predicted(req, cands, ttft=[0.1, 0.6, 0.8], tpot=[0.01, 0.01, 0.01])
    pack = SloScorer(prefer_least_headroom=True, safety_margin=0.3)
    fast, packed, risky = pack.score(req, cands)
    assert packed == pytest.approx(1.0) and fast == pytest.approx(0.2)
    assert 0 < risky <= 0.01  # 0.8 s of a 1 s objective: inside the 30% margin
    most, less, _ = SloScorer().score(req, cands)
    assert most > less  # the default keeps preferring room


def test_slo_scorer_parameters() -> None:
    scorer = SloScorer.from_parameters("s", {"headroom": "least", "safetyMargin": 0.25})
    assert scorer.prefer_least_headroom and scorer.safety_margin == 0.25
    with pytest.raises(ValueError, match="headroom"):
        SloScorer.from_parameters("s", {"headroom": "some"})
    with pytest.raises(ValueError, match="safetyMargin"):
        SloScorer.from_parameters("s", {"safetyMargin": 1.5})


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=20))
def test_headroom_scores_packing_keeps_meeting_above_missing(headroom: list[float]) -> None:
    scores = headroom_scores(np.array(headroom), prefer_least=True)
    for h, s in zip(headroom, scores, strict=True):
        assert (0.2 <= s <= 1.0) if h >= 0 else (0 < s <= 0.01)
    meeting = sorted((h, s) for h, s in zip(headroom, scores, strict=True) if h >= 0)
    assert all(a[1] >= b[1] - 1e-12 for a, b in itertools.pairwise(meeting))
