from __future__ import annotations

import pytest

from epp.parameters import ParameterError
from epp.scheduling.plugins.load_scorers import KvCacheUtilizationScorer, QueueScorer
from epp.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from tests.scheduling.builders import candidate, request


def test_queue_scorer_is_min_max_over_waiting_queue() -> None:
    cands = [candidate(n, waiting_queue_size=q) for n, q in (("a", 0), ("b", 5), ("c", 10))]
    assert QueueScorer().score(request(), cands) == [1.0, 0.5, 0.0]


def test_queue_scorer_all_equal_scores_one() -> None:
    cands = [candidate(n, waiting_queue_size=7) for n in "abc"]
    assert QueueScorer().score(request(), cands) == [1.0, 1.0, 1.0]


def test_queue_scorer_stale_endpoints_score_zero_and_leave_the_range() -> None:
    cands = [
        candidate("a", waiting_queue_size=2),
        candidate("b", waiting_queue_size=100, stale=True),
        candidate("c", waiting_queue_size=4),
    ]
    assert QueueScorer().score(request(), cands) == [1.0, 0.0, 0.0]
    assert QueueScorer().score(request(), [candidate("s", stale=True)]) == [0.0]


def test_queue_scorer_empty() -> None:
    assert QueueScorer().score(request(), []) == []


def test_kv_cache_scorer_is_one_minus_usage() -> None:
    cands = [
        candidate("a", kv_cache_usage=0.0),
        candidate("b", kv_cache_usage=0.25),
        candidate("c", kv_cache_usage=1.0),
        candidate("d", kv_cache_usage=0.1, stale=True),
    ]
    assert KvCacheUtilizationScorer().score(request(), cands) == [1.0, 0.75, 0.0, 0.0]


@pytest.mark.parametrize(
    ("running", "waiting", "max_adapters", "expected"),
    [
        ({"sql"}, set(), 1, 1.0),  # running: best, even when full
        ({"sql", "x"}, {"y"}, 4, 1.0),
        ({"x"}, set(), 2, 0.8),  # room to load one more
        ({"x"}, {"sql"}, 3, 0.8),  # room beats waiting (upstream order)
        ({"x"}, {"sql"}, 2, 0.6),  # full; the adapter is queued for loading
        ({"x"}, {"y"}, 2, 0.0),  # full, not queued
        (set(), set(), 0, 0.0),  # no LoRA support at all
    ],
)
def test_lora_affinity_scores(
    running: set[str], waiting: set[str], max_adapters: int, expected: float
) -> None:
    cand = candidate(
        "a",
        running_adapters=frozenset(running),
        waiting_adapters=frozenset(waiting),
        max_adapters=max_adapters,
    )
    assert LoraAffinityScorer().score(request(model="sql"), [cand]) == [expected]


def test_lora_affinity_stale_is_zero() -> None:
    cand = candidate("a", running_adapters=frozenset({"sql"}), max_adapters=4, stale=True)
    assert LoraAffinityScorer().score(request(model="sql"), [cand]) == [0.0]


@pytest.mark.parametrize("cls", [KvCacheUtilizationScorer, LoraAffinityScorer])
def test_parameterless_scorers_reject_parameters(cls: type[KvCacheUtilizationScorer]) -> None:
    assert cls.from_parameters("x", None).name == "x"
    with pytest.raises(ParameterError, match=r"unknown parameter .*takes none"):
        cls.from_parameters("x", {"threshold": 1})
