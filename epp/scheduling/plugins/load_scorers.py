"""Scorers over an endpoint's load metrics: `queue-scorer`, `kv-cache-utilization-scorer`,
`running-requests-size-scorer`.

All score stale candidates 0 (the worst case): an endpoint whose metrics are too old may
be overloaded for all we know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epp import parameters
from epp.scheduling.interfaces import Candidate, SchedulingRequest


def _min_max_lower_is_better(values: list[int], candidates: Sequence[Candidate]) -> list[float]:
    """(max - v) / (max - min) over fresh candidates; all equal -> 1.0; stale -> 0.0."""
    if not values:
        return []
    if any(c.stale for c in candidates):
        fresh = [v for v, c in zip(values, candidates, strict=True) if not c.stale]
        if not fresh:
            return [0.0] * len(values)
        low, high = min(fresh), max(fresh)
        span = high - low
        return [
            0.0 if c.stale else (1.0 if span == 0 else (high - v) / span)
            for v, c in zip(values, candidates, strict=True)
        ]
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    span = high - low
    return [(high - v) / span for v in values]


class QueueScorer:
    """Min-max over waiting queues: (max - q) / (max - min); all equal -> 1.0.

    `countPendingDispatches: true` selects :class:`PendingAwareQueueScorer`.
    """

    type_name = "queue-scorer"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> QueueScorer | PendingAwareQueueScorer:
        reader = parameters.ParameterReader(params)
        pending = reader.boolean("countPendingDispatches", False)
        reader.finish()
        return PendingAwareQueueScorer(name) if pending else cls(name)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return _min_max_lower_is_better(
            [c.metrics.waiting_queue_size for c in candidates], candidates
        )


class PendingAwareQueueScorer:
    """`queue-scorer` that also counts requests routed since the endpoint's last scrape.

    Metrics are up to one scrape interval old. Within that window every request sees the
    same numbers, so the least-loaded endpoint of the last scrape wins them all and a
    burst herds onto it. This scorer adds what the picker routed to each endpoint since
    its `updated_at` (`Candidate.dispatched`, kept by the data layer's ledger) to its
    waiting queue: the next scrape will show them (queued or running), until then they
    are assumed queued.
    """

    type_name = QueueScorer.type_name

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return _min_max_lower_is_better(
            [c.metrics.waiting_queue_size + c.dispatched for c in candidates], candidates
        )


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


class RunningRequestsSizeScorer:
    """Min-max over running requests: (max - r) / (max - min); all equal -> 1.0."""

    type_name = "running-requests-size-scorer"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> RunningRequestsSizeScorer:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return _min_max_lower_is_better(
            [c.metrics.running_requests for c in candidates], candidates
        )
