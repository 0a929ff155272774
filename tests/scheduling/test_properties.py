"""Properties that must hold for any metrics, prompts and weights."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.scheduling import framework
from epp.scheduling.interfaces import Candidate, Scorer
from epp.scheduling.plugins.load_scorers import KvCacheUtilizationScorer, QueueScorer
from epp.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer, PrefixSettings
from epp.scheduling.plugins.prefix_scorer import PrefixCacheScorer
from epp.scheduling.plugins.profile_handler import SingleProfileHandler
from tests.scheduling.builders import endpoint, request

ADAPTERS = st.frozensets(st.sampled_from(["a1", "a2", "a3", "base"]), max_size=3)

metrics_strategy = st.builds(
    EndpointMetrics,
    waiting_queue_size=st.integers(0, 10_000),
    running_requests=st.integers(0, 1_000),
    kv_cache_usage=st.floats(0.0, 1.0),
    running_adapters=ADAPTERS,
    waiting_adapters=ADAPTERS,
    max_adapters=st.integers(0, 4),
    cache_block_size=st.sampled_from([0, 16, 32]),
    cache_num_blocks=st.integers(0, 50),
)


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    count = draw(st.integers(1, 8))
    return [
        Candidate(endpoint(f"pod{i}"), draw(metrics_strategy), draw(st.booleans()))
        for i in range(count)
    ]


PROMPTS = st.text(alphabet="abcé ", max_size=400)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    rounds=st.lists(st.tuples(candidate_lists(), PROMPTS), min_size=1, max_size=6),
    weights=st.tuples(*(st.floats(0.0, 10.0) for _ in range(4))),
    max_endpoints=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    model=st.sampled_from(["a1", "base"]),
)
def test_scores_in_unit_interval_and_picks_come_from_candidates(
    rounds: list[tuple[list[Candidate], str]],
    weights: tuple[float, float, float, float],
    max_endpoints: int,
    seed: int,
    model: str,
) -> None:
    producer = ApproxPrefixCacheProducer(settings=PrefixSettings(block_chars=8, lru_capacity=20))
    scorers: list[Scorer] = [
        QueueScorer(),
        KvCacheUtilizationScorer(),
        LoraAffinityScorer(),
        PrefixCacheScorer(),
    ]
    profile = framework.SchedulingProfile(
        "default",
        picker=MaxScorePicker(max_endpoints=max_endpoints, rng=random.Random(seed)),
        scorers=list(zip(scorers, weights, strict=True)),
        producers=[producer],
    )
    scheduler = framework.Scheduler({"default": profile}, SingleProfileHandler())
    for i, (cands, prompt) in enumerate(rounds):
        req = request(prompt, model=model, request_id=f"r{i}")
        result = scheduler.schedule(req, cands)
        for scorer in scorers:
            scores = scorer.score(req, cands)
            assert len(scores) == len(cands)
            assert all(0.0 <= s <= 1.0 for s in scores), (scorer.type_name, scores)
        primary = result.primary
        assert primary is not None
        assert 1 <= len(primary.targets) <= min(max_endpoints, len(cands))
        assert all(any(t is c for c in cands) for t in primary.targets)
        assert len({id(t) for t in primary.targets}) == len(primary.targets)
        producer.pre_request(req, result)
