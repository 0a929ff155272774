"""`utilization-detector`: is the pool full?

An endpoint's saturation = max((waiting + dispatched) / queueDepthThreshold,
kvCacheUsage / kvCacheUtilThreshold), where `dispatched` counts what the picker routed
there since the scrape; the pool's (a gauge, and the shedding rule without flow control)
is the mean over endpoints; an endpoint whose metrics are older than
`metricsStalenessThreshold` counts 1.0 (it may be full for all we know), and a pool with no
endpoints counts as full, so requests wait for the first endpoint (scale from zero).

Named in a scheduling profile, the same detector also filters endpoints (see
`epp.scheduling.plugins.saturation_filter`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from epp import parameters
from epp.datalayer.endpoint_metrics import EndpointLoad, EndpointMetrics


class UtilizationDetector:
    type_name = "utilization-detector"

    def __init__(
        self,
        name: str = type_name,
        *,
        queue_depth_threshold: int = 5,
        kv_cache_util_threshold: float = 0.8,
        metrics_staleness_threshold_s: float = 0.2,
    ) -> None:
        self.name = name
        self.queue_depth_threshold = queue_depth_threshold
        self.kv_cache_util_threshold = kv_cache_util_threshold
        self.metrics_staleness_threshold_s = metrics_staleness_threshold_s

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> UtilizationDetector:
        reader = parameters.ParameterReader(params)
        queue = reader.integer("queueDepthThreshold", 5, minimum=1)
        kv = reader.number("kvCacheUtilThreshold", 0.8, minimum=0.0)
        if not 0.0 < kv <= 1.0:
            raise parameters.ParameterError("kvCacheUtilThreshold", f"must be in (0, 1], got {kv}")
        staleness = reader.duration("metricsStalenessThreshold", 0.2)
        reader.finish()
        return cls(
            name,
            queue_depth_threshold=queue,
            kv_cache_util_threshold=kv,
            metrics_staleness_threshold_s=staleness,
        )

    def same_settings(self, other: object) -> bool:
        return (
            isinstance(other, UtilizationDetector)
            and other.queue_depth_threshold == self.queue_depth_threshold
            and other.kv_cache_util_threshold == self.kv_cache_util_threshold
            and other.metrics_staleness_threshold_s == self.metrics_staleness_threshold_s
        )

    def endpoint_saturation(
        self, metrics: EndpointMetrics, now: float, dispatched: int = 0
    ) -> float:
        if metrics.is_stale(now, self.metrics_staleness_threshold_s):
            return 1.0
        return max(
            (metrics.waiting_queue_size + dispatched) / self.queue_depth_threshold,
            metrics.kv_cache_usage / self.kv_cache_util_threshold,
        )

    def saturation(self, endpoints: Sequence[EndpointLoad], now: float) -> float:
        if not endpoints:
            return math.inf
        total = 0.0
        for load in endpoints:
            total += self.endpoint_saturation(load.metrics, now, load.dispatched)
        return total / len(endpoints)

    def request_load(self) -> float:
        # Worst case: the request waits, one more in its endpoint's waiting queue.
        return 1.0 / self.queue_depth_threshold
