"""How many queued requests may leave before the next scrape shows their effect.

Saturation comes from scraped metrics, which lag: requests dispatched since the last
scrape are invisible to it. So each request dispatched from a queue counts as
`detector.request_load(n) / scale` of extra saturation until the next scrape lands, and a
dip below the ceiling lets a measured batch through in priority order instead of the whole
queue (which would pile up at the servers, first come first served, for a long time).

The estimate is pessimistic (it assumes every request waits at a server), so `scale`
starts at 1 and doubles at each scrape that finds the pool below saturation 0.5 after the
previous batch used its whole budget: the pool had more room than estimated, and e.g. a
queue built while a scrape was late drains within a few scrapes rather than at a few
requests per scrape. A scrape showing saturation >= 0.5 puts `scale` back to 1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.flowcontrol.interfaces import SaturationDetector

MAX_SCALE = 1024.0
# Below this measured saturation, a batch that used its whole budget means there was room.
ROOM = 0.5


class DispatchBudget:
    def __init__(self) -> None:
        self._scrape_mark = -1.0
        self._pending = 0  # dispatched from queues since the last scrape
        self._scale = 1.0
        self._used_up = False
        self._load = 0.0
        self.saturation = 0.0

    def measure(self, detector: SaturationDetector, endpoints: Sequence[EndpointMetrics]) -> float:
        """The pool's saturation now; a new scrape starts a new budget."""
        value = detector.saturation(endpoints, time.monotonic())
        newest = max((m.updated_at for m in endpoints), default=0.0)
        if newest != self._scrape_mark:
            self._scrape_mark = newest
            self._pending = 0
            if value >= ROOM:
                self._scale = 1.0
            elif self._used_up:
                self._scale = min(self._scale * 2.0, MAX_SCALE)
            self._used_up = False
        self._load = detector.request_load(len(endpoints)) / self._scale
        self.saturation = value
        return value

    def allows(self, ceiling: float) -> bool:
        """Whether one more queued request may go under a band's saturation ceiling."""
        if self.saturation + self._pending * self._load < ceiling:
            return True
        self._used_up = self.saturation < ceiling
        return False

    def spend(self) -> None:
        self._pending += 1
