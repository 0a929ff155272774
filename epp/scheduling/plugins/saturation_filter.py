"""The saturation detector's filter face: named in a scheduling profile, a detector such as
`utilization-detector` keeps the endpoints it does not consider full.

It keeps every endpoint below saturation 1.0 (fresh metrics, queue — counting what the
picker routed there since the scrape — and KV cache under the detector's thresholds);
when none is, it keeps them all, because shedding load is flow
control's decision, not the scheduler's. The detector itself belongs to flow control; this
plugin only asks it about one endpoint at a time, so scheduling never depends on flow
control.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.scheduling.interfaces import Candidate, SchedulingRequest


class EndpointSaturation(Protocol):
    type_name: str
    name: str

    def endpoint_saturation(
        self, metrics: EndpointMetrics, now: float, dispatched: int = 0
    ) -> float: ...


class SaturationFilter:
    """Filter plugin around a detector; it takes the detector's name and type for metrics
    and messages, since in the config it *is* the detector."""

    def __init__(self, detector: EndpointSaturation) -> None:
        self.detector = detector
        self.type_name = detector.type_name
        self.name = detector.name

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        now = time.monotonic()
        saturation = self.detector.endpoint_saturation
        kept = [c for c in candidates if saturation(c.metrics, now, c.dispatched) < 1.0]
        return kept or candidates


def can_filter(plugin: object) -> bool:
    return callable(getattr(plugin, "endpoint_saturation", None))
