"""Pickers, scorers, filter and handler beyond the default profile's plugins."""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest

from epp import parameters
from epp.datalayer.endpoint_metrics import EndpointMetrics, MetricsStore
from epp.datastore.snapshot import EndpointKey
from epp.scheduling import framework
from epp.scheduling.interfaces import Candidate, ProfileResult, SchedulingResult
from epp.scheduling.plugins.header_filter import HeaderBasedTestingFilter
from epp.scheduling.plugins.load_scorers import (
    PendingAwareQueueScorer,
    QueueScorer,
    RunningRequestsSizeScorer,
)
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.metric_scorer import MetricScorer
from epp.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.prefix_scorer import PrefixCacheScorer
from epp.scheduling.plugins.profile_handler import MultiProfileHandler
from epp.scheduling.plugins.random_pickers import RandomPicker, WeightedRandomPicker
from tests.scheduling.builders import candidate, endpoint, request


def _custom(name: str, stale: bool = False, **custom: float) -> Candidate:
    return Candidate(endpoint(name), EndpointMetrics(custom=custom), stale)


# -- pickers -------------------------------------------------------------------------


def test_random_picker_is_uniform_and_ignores_scores() -> None:
    cands = [candidate(n) for n in "abcd"]
    picker = RandomPicker(rng=random.Random(1))
    counts = collections.Counter(
        picker.pick(request(), cands, [1.0, 0.0, 0.0, 0.0]).targets[0].endpoint.pod_name
        for _ in range(4000)
    )
    assert set(counts) == set("abcd")
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_random_picker_returns_distinct_fallbacks() -> None:
    cands = [candidate(n) for n in "abc"]
    result = RandomPicker(max_endpoints=5, rng=random.Random(2)).pick(request(), cands, [0] * 3)
    assert sorted(c.endpoint.pod_name for c in result.targets) == ["a", "b", "c"]
    assert RandomPicker().pick(request(), [], []).targets == ()


def test_weighted_random_picker_follows_weights() -> None:
    cands = [candidate(n) for n in "abc"]
    picker = WeightedRandomPicker(rng=random.Random(3))
    counts = collections.Counter(
        picker.pick(request(), cands, [3.0, 1.0, 0.0]).targets[0].endpoint.pod_name
        for _ in range(8000)
    )
    assert "c" not in counts  # zero weight loses to any positive weight
    assert 2.6 < counts["a"] / counts["b"] < 3.4, counts


def test_weighted_random_picker_all_zero_is_uniform_and_orders_fallbacks() -> None:
    cands = [candidate(n) for n in "abc"]
    picker = WeightedRandomPicker(max_endpoints=3, rng=random.Random(4))
    firsts = collections.Counter(
        picker.pick(request(), cands, [0.0, 0.0, 0.0]).targets[0].endpoint.pod_name
        for _ in range(3000)
    )
    assert all(800 < n < 1200 for n in firsts.values()), firsts
    result = picker.pick(request(), cands, [0.0, 5.0, float("nan")])
    assert result.targets[0].endpoint.pod_name == "b" and len(result.targets) == 3


@pytest.mark.parametrize("cls", [RandomPicker, WeightedRandomPicker])
def test_picker_parameters(cls: type[RandomPicker] | type[WeightedRandomPicker]) -> None:
    assert cls.from_parameters("p", {"maxNumOfEndpoints": 3}).max_endpoints == 3
    with pytest.raises(parameters.ParameterError, match="at least 1"):
        cls.from_parameters("p", {"maxNumOfEndpoints": 0})


# -- scorers -------------------------------------------------------------------------


def test_running_requests_size_scorer_is_min_max() -> None:
    cands = [candidate(n, running_requests=r) for n, r in (("a", 2), ("b", 6), ("c", 10))]
    assert RunningRequestsSizeScorer().score(request(), cands) == [1.0, 0.5, 0.0]
    equal = [candidate(n, running_requests=4) for n in "ab"]
    assert RunningRequestsSizeScorer().score(request(), equal) == [1.0, 1.0]
    stale = [candidate("a", running_requests=1), candidate("b", stale=True)]
    assert RunningRequestsSizeScorer().score(request(), stale) == [1.0, 0.0]


def test_metric_scorer_with_bounds_and_direction() -> None:
    cands = [_custom("a", load=0.0), _custom("b", load=5.0), _custom("c", load=20.0)]
    lower = MetricScorer(metric_name="load", minimum=0, maximum=10)
    assert lower.score(request(), cands) == [1.0, 0.5, 0.0]  # clamped above max
    higher = MetricScorer.from_parameters(
        "m", {"metricName": "load", "min": 0, "max": 10, "direction": "higher-is-better"}
    )
    assert higher.score(request(), cands) == [0.0, 0.5, 1.0]


def test_metric_scorer_normalises_over_candidates_without_bounds() -> None:
    cands = [_custom("a", load=4.0), _custom("b", load=8.0), _custom("c", load=6.0)]
    assert MetricScorer(metric_name="load").score(request(), cands) == [1.0, 0.0, 0.5]
    same = [_custom("a", load=3.0), _custom("b", load=3.0)]
    assert MetricScorer(metric_name="load").score(request(), same) == [1.0, 1.0]


def test_metric_scorer_missing_and_stale() -> None:
    cands = [_custom("a", load=2.0), _custom("b"), _custom("c", stale=True, load=0.0)]
    no_default = MetricScorer(metric_name="load", minimum=0, maximum=4)
    assert no_default.score(request(), cands) == [0.5, 0.0, 0.0]
    with_default = MetricScorer(metric_name="load", minimum=0, maximum=4, default_value=1.0)
    assert with_default.score(request(), cands) == [0.5, 0.75, 0.0]
    assert MetricScorer(metric_name="load").score(request(), [_custom("x")]) == [0.0]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "metricName: required"),
        ({"metricName": "x", "min": 1}, "max: give both"),
        ({"metricName": "x", "min": 2, "max": 1}, "max: must be greater than min"),
        ({"metricName": "x", "direction": "lower-is-beter"}, "did you mean 'lower-is-better'"),
        ({"metricName": "x", "defaultValue": "0"}, "defaultValue: must be a number"),
        ({"metricName": "x", "minimum": 0}, "minimum: unknown parameter"),
    ],
)
def test_metric_scorer_parameter_errors(params: dict[str, object], message: str) -> None:
    with pytest.raises(parameters.ParameterError, match=message):
        MetricScorer.from_parameters("m", params)


def test_prefix_scorer_min_blocks_for_full_score() -> None:
    producer = ApproxPrefixCacheProducer()
    cands = [candidate("a"), candidate("b")]
    short = request("s" * 64 * 2)  # two blocks of 64 characters
    producer.produce(short, cands)
    producer.pre_request(short, SchedulingResult({"p": ProfileResult((cands[0],))}, "p"))
    again = request("s" * 64 * 2)
    producer.produce(again, cands)
    assert PrefixCacheScorer().score(again, cands) == [1.0, 0.0]  # upstream's formula
    tuned = PrefixCacheScorer.from_parameters("p", {"minBlocksForFullScore": 8})
    assert tuned.score(again, cands) == [0.25, 0.0]  # 2 of at least 8
    long = request("s" * 64 * 2 + "t" * 64 * 10)  # 12 blocks, 2 matched: unchanged
    producer.produce(long, cands)
    assert tuned.score(long, cands) == PrefixCacheScorer().score(long, cands) == [2 / 12, 0.0]
    with pytest.raises(parameters.ParameterError, match="at least 0"):
        PrefixCacheScorer.from_parameters("p", {"minBlocksForFullScore": -1})


# -- filter --------------------------------------------------------------------------


def test_header_based_testing_filter() -> None:
    a, b = (
        candidate(
            "a",
        ),
        candidate("b"),
    )
    f = HeaderBasedTestingFilter()
    req = request()
    assert f.filter(req, [a, b]) == []  # no header: nothing (test traffic only)
    req.headers = {"test-epp-endpoint-selection": f" {b.endpoint.address} ,10.9.9.9"}
    assert f.filter(req, [a, b]) == [b]
    req.headers = {"test-epp-endpoint-selection": f"{a.endpoint.target}"}
    assert f.filter(req, [a, b]) == [a]
    req.headers = {"test-epp-endpoint-selection": f"{a.endpoint.address}:1"}
    assert f.filter(req, [a, b]) == []  # wrong port
    custom = HeaderBasedTestingFilter.from_parameters("f", {"headerName": "X-Only"})
    req.headers = {"x-only": a.endpoint.address}
    assert custom.filter(req, [a, b]) == [a]


# -- multi-profile handler ------------------------------------------------------------


class _Only:
    """A filter keeping one pod by name (test helper)."""

    type_name = "only"

    def __init__(self, pod: str) -> None:
        self.name = f"only-{pod}"
        self.pod = pod

    def filter(self, request, candidates):  # type: ignore[no-untyped-def]
        return [c for c in candidates if c.endpoint.pod_name == self.pod]


def _scheduler(handler: MultiProfileHandler) -> framework.Scheduler:
    def profile(name: str, pod: str) -> framework.SchedulingProfile:
        return framework.SchedulingProfile(name, picker=MaxScorePicker(), filters=[_Only(pod)])

    return framework.Scheduler(
        {"strict": profile("strict", "z"), "shadow": profile("shadow", "b")}, handler
    )


def test_multi_profile_handler_runs_every_profile_once() -> None:
    cands = [candidate(n) for n in "ab"]
    result = _scheduler(MultiProfileHandler()).schedule(request(), cands)
    assert result.primary_profile == "strict" and result.primary is None
    shadow = result.profile_results["shadow"]
    assert shadow is not None and shadow.targets[0].endpoint.pod_name == "b"

    chosen = _scheduler(MultiProfileHandler(primary_profile="shadow")).schedule(request(), cands)
    assert chosen.primary_profile == "shadow"


def test_multi_profile_handler_fallback() -> None:
    cands = [candidate(n) for n in "ab"]
    handler = MultiProfileHandler.from_parameters("h", {"fallback": True})
    result = _scheduler(handler).schedule(request(), cands)
    assert result.primary_profile == "shadow"
    assert result.primary is not None and result.primary.targets[0].endpoint.pod_name == "b"


def test_multi_profile_handler_checks_primary_profile_name() -> None:
    handler = MultiProfileHandler(primary_profile="shadw")
    with pytest.raises(parameters.ParameterError, match="did you mean 'shadow'"):
        handler.check_profiles(["strict", "shadow"])


def test_queue_scorer_rejects_unknown_parameters() -> None:
    with pytest.raises(parameters.ParameterError, match=r"threshold: unknown parameter"):
        QueueScorer.from_parameters("q", {"threshold": 1})
    assert type(QueueScorer.from_parameters("q", None)) is QueueScorer


def test_pending_aware_queue_scorer_counts_dispatches_the_metrics_have_not_seen() -> None:
    scorer = QueueScorer.from_parameters("q", {"countPendingDispatches": True})
    assert isinstance(scorer, PendingAwareQueueScorer)
    a, b = candidate("a", updated_at=9.0), candidate("b", waiting_queue_size=1, updated_at=9.0)
    assert scorer.score(request(), [a, b]) == [1.0, 0.0]
    # Three requests routed to a within one scrape interval: a counts 0 + 3 > b's 1.
    routed = dataclasses.replace(a, dispatched=3)
    assert scorer.score(request(), [routed, b]) == [0.0, 1.0]


def test_the_ledger_counts_dispatches_until_the_next_scrape() -> None:
    store = MetricsStore()
    key = EndpointKey("a")
    store.put(key, EndpointMetrics(waiting_queue_size=1, updated_at=9.0))
    for _ in range(3):
        store.record_dispatch(key, tokens=100)
    assert store.load(key) == (EndpointMetrics(waiting_queue_size=1, updated_at=9.0), 3, 300)
    store.put(key, EndpointMetrics(waiting_queue_size=4, updated_at=10.0))  # a new scrape
    assert store.load(key).dispatched == 0
    store.record_dispatch(key)
    assert store.load(key)[1:] == (1, 0)
    store.retain([])
    assert store.load(key).dispatched == 0
