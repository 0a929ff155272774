"""Scorers over an endpoint's load metrics: `queue-scorer` and `kv-cache-utilization-scorer`.

Both score stale candidates 0 (the worst case): an endpoint whose metrics are too old may
be overloaded for all we know (DESIGN §6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epp.scheduling.interfaces import Candidate, SchedulingRequest
from epp.scheduling.plugins import parameters


class QueueScorer:
    """Min-max over waiting queues: (max - q) / (max - min); all equal -> 1.0."""

    type_name = "queue-scorer"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> QueueScorer:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        queues = [c.metrics.waiting_queue_size for c in candidates]
        if not queues:
            return []
        if any(c.stale for c in candidates):
            fresh = [q for q, c in zip(queues, candidates, strict=True) if not c.stale]
            if not fresh:
                return [0.0] * len(queues)
            low, high = min(fresh), max(fresh)
            span = high - low
            return [
                0.0 if c.stale else (1.0 if span == 0 else (high - q) / span)
                for q, c in zip(queues, candidates, strict=True)
            ]
        low, high = min(queues), max(queues)
        if high == low:
            return [1.0] * len(queues)
        span = high - low
        return [(high - q) / span for q in queues]


class KvCacheUtilizationScorer:
    """1 - KV-cache usage: the emptier the cache, the better."""

    type_name = "kv-cache-utilization-scorer"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> KvCacheUtilizationScorer:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return [0.0 if c.stale else 1.0 - c.metrics.kv_cache_usage for c in candidates]
