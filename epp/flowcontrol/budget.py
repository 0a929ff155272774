"""How many queued requests may leave now: the room left below a band's ceiling, summed
over the endpoints that have any.

Flow control is work-conserving: it dispatches while *some* endpoint has room, not while
the pool's mean saturation is below the ceiling (a mean lets one hot endpoint hold the
whole pool back while others sit idle). An endpoint's saturation counts what the picker
routed there since its last scrape (`EndpointLoad.dispatched`), and each request adds
`detector.request_load()` to it, so the room of endpoint e in requests is
(ceiling - saturation_e) / request_load. The scheduler sees the same per-endpoint
saturation (the detector's filter face runs first in every profile while flow control is
on), so a dispatched request goes where the room is.

Between a dispatch and the moment its request is routed (the waiting task resumes on the
next turn of the loop), the request is in neither count: `in_transit` covers that gap.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from epp.datalayer.endpoint_metrics import EndpointLoad
from epp.flowcontrol.interfaces import SaturationDetector


class DispatchBudget:
    def __init__(self) -> None:
        self._saturations: list[float] = []
        self._load = 1.0
        self.saturation = 0.0  # the pool's mean, for the gauge
        self.in_transit = 0  # dispatched from a queue, not routed yet

    def measure(self, detector: SaturationDetector, endpoints: Sequence[EndpointLoad]) -> float:
        """Take the endpoints' saturations now; returns the pool's mean."""
        now = time.monotonic()
        self._saturations = [
            detector.endpoint_saturation(load.metrics, now, load.dispatched) for load in endpoints
        ]
        self._load = detector.request_load()
        self.saturation = detector.saturation(endpoints, now)
        return self.saturation

    def room(self, ceiling: float) -> float:
        """Requests that fit below `ceiling`, over every endpoint, minus those in transit."""
        total = 0.0
        for saturation in self._saturations:
            if saturation < ceiling:
                total += (ceiling - saturation) / self._load
        return total - self.in_transit

    def allows(self, ceiling: float) -> bool:
        """Whether one more queued request may go under a band's saturation ceiling."""
        return self.room(ceiling) > 0
