from __future__ import annotations

import random
from collections import Counter

import pytest

from epp.parameters import ParameterError
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from tests.scheduling.builders import candidate, request


def test_highest_score_wins() -> None:
    cands = [candidate(n) for n in "abc"]
    result = MaxScorePicker(rng=random.Random(1)).pick(request(), cands, [0.2, 0.9, 0.5])
    assert result.targets == (cands[1],)


def test_ties_are_broken_at_random_among_the_best_only() -> None:
    cands = [candidate(n) for n in "abcd"]
    picker = MaxScorePicker(rng=random.Random(7))
    chosen = Counter(
        picker.pick(request(), cands, [1.0, 0.3, 1.0, 1.0]).targets[0].endpoint.pod_name
        for _ in range(600)
    )
    assert set(chosen) == {"a", "c", "d"}
    assert min(chosen.values()) > 120  # roughly uniform: 200 each expected


def test_max_num_of_endpoints_returns_best_first() -> None:
    cands = [candidate(n) for n in "abcde"]
    picker = MaxScorePicker(max_endpoints=3, rng=random.Random(3))
    result = picker.pick(request(), cands, [0.1, 0.9, 0.5, 0.7, 0.3])
    assert [t.endpoint.pod_name for t in result.targets] == ["b", "d", "c"]


def test_max_num_of_endpoints_larger_than_candidates() -> None:
    cands = [candidate(n) for n in "ab"]
    result = MaxScorePicker(max_endpoints=5).pick(request(), cands, [0.1, 0.2])
    assert [t.endpoint.pod_name for t in result.targets] == ["b", "a"]


def test_fallback_ties_are_shuffled() -> None:
    cands = [candidate(n) for n in "abc"]
    picker = MaxScorePicker(max_endpoints=2, rng=random.Random(11))
    firsts = Counter(
        picker.pick(request(), cands, [0.5, 0.5, 0.5]).targets[0].endpoint.pod_name
        for _ in range(300)
    )
    assert set(firsts) == {"a", "b", "c"}


def test_empty_candidates_give_no_targets() -> None:
    assert MaxScorePicker().pick(request(), [], []).targets == ()


def test_parameters() -> None:
    assert MaxScorePicker.from_parameters("p", None).max_endpoints == 1
    assert MaxScorePicker.from_parameters("p", {"maxNumOfEndpoints": 4}).max_endpoints == 4
    with pytest.raises(ParameterError, match="maxNumOfEndpoints: must be at least 1"):
        MaxScorePicker.from_parameters("p", {"maxNumOfEndpoints": 0})
    with pytest.raises(ParameterError, match="must be an integer, got string"):
        MaxScorePicker.from_parameters("p", {"maxNumOfEndpoints": "2"})
    with pytest.raises(ParameterError, match="must be an integer, got boolean"):
        MaxScorePicker.from_parameters("p", {"maxNumOfEndpoints": True})
    with pytest.raises(ParameterError, match="did you mean 'maxNumOfEndpoints'"):
        MaxScorePicker.from_parameters("p", {"maxNumEndpoints": 2})
