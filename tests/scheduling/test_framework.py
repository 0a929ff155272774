from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import pytest

from epp import metrics
from epp.scheduling import framework
from epp.scheduling.interfaces import (
    Candidate,
    ProfileResult,
    SchedulingRequest,
    SchedulingResult,
)
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.profile_handler import SingleProfileHandler
from tests.scheduling.builders import candidate, request


class Recorder:
    """Test plugin that logs calls into a shared list."""

    type_name = "test-recorder"

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log


class KeepFilter(Recorder):
    type_name = "test-keep-filter"

    def __init__(self, name: str, log: list[str], keep: set[str]) -> None:
        super().__init__(name, log)
        self.keep = keep

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        self.log.append(f"filter:{self.name}:{len(candidates)}")
        return [c for c in candidates if c.endpoint.pod_name in self.keep]


class FixedScorer(Recorder):
    type_name = "test-fixed-scorer"

    def __init__(self, name: str, log: list[str], scores: Mapping[str, float]) -> None:
        super().__init__(name, log)
        self.scores = scores

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        self.log.append(f"score:{self.name}")
        return [self.scores.get(c.endpoint.pod_name, 0.0) for c in candidates]


class Producer(Recorder):
    type_name = "test-producer"

    def produce(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> None:
        self.log.append(f"produce:{self.name}")
        request.plugin_data[self.name] = len(candidates)


class CapturePicker(MaxScorePicker):
    def __init__(self) -> None:
        super().__init__("capture", rng=random.Random(0))
        self.scores: list[float] = []

    def pick(
        self, request: SchedulingRequest, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> ProfileResult:
        self.scores = list(scores)
        return super().pick(request, candidates, scores)


def _scheduler(*profiles: framework.SchedulingProfile) -> framework.Scheduler:
    handler = SingleProfileHandler() if len(profiles) == 1 else AllProfilesHandler()
    return framework.Scheduler({p.name: p for p in profiles}, handler)  # type: ignore[arg-type]


class AllProfilesHandler:
    """Runs every profile, one per round; primary is the first."""

    type_name = "test-all-profiles"
    name = "all"

    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, object],
        results_so_far: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        return [n for n in profiles if n not in results_so_far][:1]

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        return SchedulingResult(results, next(iter(results)))


CANDS = [candidate(n) for n in "abcd"]


def test_order_producers_filters_scorers_picker_and_weights() -> None:
    log: list[str] = []
    picker = CapturePicker()
    profile = framework.SchedulingProfile(
        "default",
        picker=picker,
        producers=[Producer("p", log)],
        filters=[KeepFilter("f1", log, {"a", "b", "c"}), KeepFilter("f2", log, {"b", "c"})],
        scorers=[
            framework.WeightedScorer(FixedScorer("s1", log, {"b": 1.0, "c": 0.5}), 2.0),
            (FixedScorer("s2", log, {"b": 0.0, "c": 1.0}), 3.0),
        ],
    )
    req = request()
    result = _scheduler(profile).schedule(req, CANDS)
    assert log == ["produce:p", "filter:f1:4", "filter:f2:3", "score:s1", "score:s2"]
    assert picker.scores == [2.0, 4.0]  # b: 1*2 + 0*3, c: 0.5*2 + 1*3
    assert result.primary is not None
    assert result.primary.targets[0].endpoint.pod_name == "c"
    assert result.primary_profile == "default"
    assert req.plugin_data["p"] == 4  # producers see every candidate, before filters


def test_empty_filter_result_stops_the_profile() -> None:
    log: list[str] = []
    profile = framework.SchedulingProfile(
        "default",
        picker=MaxScorePicker(),
        filters=[KeepFilter("none", log, set()), KeepFilter("later", log, {"a"})],
        scorers=[(FixedScorer("s", log, {}), 1.0)],
    )
    result = _scheduler(profile).schedule(request(), CANDS)
    assert log == ["filter:none:4"]
    assert result.primary is None
    assert result.profile_results == {"default": None}


def test_no_candidates_gives_no_result() -> None:
    profile = framework.SchedulingProfile("default", picker=MaxScorePicker())
    assert _scheduler(profile).schedule(request(), []).primary is None


def test_scores_are_clamped_to_unit_interval() -> None:
    picker = CapturePicker()
    scorer = FixedScorer("wild", [], {"a": 5.0, "b": -3.0, "c": math.nan, "d": 0.25})
    profile = framework.SchedulingProfile("default", picker=picker, scorers=[(scorer, 2.0)])
    _scheduler(profile).schedule(request(), CANDS)
    assert picker.scores == [2.0, 0.0, 0.0, 0.5]


def test_scorer_returning_wrong_length_is_an_error() -> None:
    class Short(FixedScorer):
        def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
            return [1.0]

    profile = framework.SchedulingProfile(
        "default", picker=MaxScorePicker(), scorers=[(Short("short", [], {}), 1.0)]
    )
    with pytest.raises(ValueError, match="'short' returned 1 scores for 4 candidates"):
        _scheduler(profile).schedule(request(), CANDS)


@pytest.mark.parametrize("weight", [-1.0, math.inf, math.nan])
def test_bad_weights_are_rejected(weight: float) -> None:
    with pytest.raises(ValueError, match="weights must be finite numbers >= 0"):
        framework.SchedulingProfile(
            "p", picker=MaxScorePicker(), scorers=[(FixedScorer("s", [], {}), weight)]
        )


def test_multiple_profiles_share_a_producer_run_once() -> None:
    log: list[str] = []
    producer = Producer("shared", log)
    first = framework.SchedulingProfile(
        "first",
        picker=MaxScorePicker(),
        producers=[producer],
        filters=[KeepFilter("fa", log, {"a"})],
    )
    second = framework.SchedulingProfile(
        "second",
        picker=MaxScorePicker(),
        producers=[producer],
        filters=[KeepFilter("fb", log, {"b"})],
    )
    result = _scheduler(first, second).schedule(request(), CANDS)
    assert log == ["produce:shared", "filter:fa:4", "filter:fb:4"]
    assert result.primary_profile == "first"
    assert result.primary is not None and result.primary.targets[0].endpoint.pod_name == "a"
    second_result = result.profile_results["second"]
    assert second_result is not None and second_result.targets[0].endpoint.pod_name == "b"


def test_handler_picking_unknown_profile_is_an_error() -> None:
    class Wrong(AllProfilesHandler):
        def pick_profiles(self, *args: object) -> list[str]:
            return ["nope"]

    profile = framework.SchedulingProfile("default", picker=MaxScorePicker())
    scheduler = framework.Scheduler({"default": profile}, Wrong())
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        scheduler.schedule(request(), CANDS)


def _count(extension_point: str, plugin_type: str, plugin_name: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "inference_extension_plugin_duration_seconds_count",
        {
            "extension_point": extension_point,
            "plugin_type": plugin_type,
            "plugin_name": plugin_name,
        },
    )
    return value or 0.0


def test_plugin_and_cycle_durations_are_recorded() -> None:
    log: list[str] = []
    profile = framework.SchedulingProfile(
        "default",
        picker=MaxScorePicker("metrics-picker"),
        producers=[Producer("metrics-producer", log)],
        filters=[KeepFilter("metrics-filter", log, {"a"})],
        scorers=[(FixedScorer("metrics-scorer", log, {}), 1.0)],
    )
    scheduler = _scheduler(profile)
    before = {
        point: _count(point, kind, name)
        for point, kind, name in [
            ("PrepareData", "test-producer", "metrics-producer"),
            ("Filter", "test-keep-filter", "metrics-filter"),
            ("Scorer", "test-fixed-scorer", "metrics-scorer"),
            ("Picker", "max-score-picker", "metrics-picker"),
            ("ProfilePicker", "single-profile-handler", "single-profile-handler"),
            ("ProcessProfilesResults", "single-profile-handler", "single-profile-handler"),
        ]
    }
    cycles = (
        metrics.REGISTRY.get_sample_value(
            "inference_extension_scheduler_e2e_duration_seconds_count"
        )
        or 0.0
    )
    scheduler.schedule(request(), CANDS)
    assert _count("PrepareData", "test-producer", "metrics-producer") == before["PrepareData"] + 1
    assert _count("Filter", "test-keep-filter", "metrics-filter") == before["Filter"] + 1
    assert _count("Scorer", "test-fixed-scorer", "metrics-scorer") == before["Scorer"] + 1
    assert _count("Picker", "max-score-picker", "metrics-picker") == before["Picker"] + 1
    # The single handler is asked twice: once to start, once to learn the cycle is over.
    handler = ("single-profile-handler", "single-profile-handler")
    assert _count("ProfilePicker", *handler) == before["ProfilePicker"] + 2
    assert _count("ProcessProfilesResults", *handler) == before["ProcessProfilesResults"] + 1
    assert (
        metrics.REGISTRY.get_sample_value(
            "inference_extension_scheduler_e2e_duration_seconds_count"
        )
        == cycles + 1
    )


def test_single_profile_handler_refuses_several_profiles() -> None:
    profiles = {n: framework.SchedulingProfile(n, picker=MaxScorePicker()) for n in ("x", "y")}
    scheduler = framework.Scheduler(profiles, SingleProfileHandler())
    with pytest.raises(ValueError, match="exactly one profile"):
        scheduler.schedule(request(), CANDS)
