"""Endpoints that take requests and never answer them.

A model server that hangs may still accept connections and even serve `/metrics`, so the
data layer keeps calling it healthy. What shows it is its requests: one that ends with no
response headers — Envoy gave up on it (its route or idle timeout answers 504 itself, or
the stream is closed) — after `timeout_s` in flight. Such an endpoint is held out of
routing for `hold_s`, then tried again (an endpoint held out is treated as stale: it gets
requests only when no fresh endpoint is left).
"""

from __future__ import annotations

import logging
import time

from epp.datalayer.endpoint_metrics import MetricsStore
from epp.datastore.snapshot import EndpointKey
from epp.requestcontrol.interfaces import ResponseSummary

log = logging.getLogger(__name__)

DEFAULT_HOLD_S = 10.0
_GATEWAY_TIMEOUT = 504


class UnansweredRequests:
    __slots__ = ("_store", "hold_s", "timeout_s")

    def __init__(self, store: MetricsStore, timeout_s: float, hold_s: float = DEFAULT_HOLD_S):
        self._store = store
        self.timeout_s = timeout_s
        self.hold_s = hold_s

    def request_ended(self, key: EndpointKey, summary: ResponseSummary) -> None:
        if summary.status not in (0, _GATEWAY_TIMEOUT) or summary.duration_s < self.timeout_s:
            return
        if summary.status == _GATEWAY_TIMEOUT and summary.streaming:
            return  # a stream that began and then stalled was answered: not a hung server
        now = time.monotonic()
        if not self._store.held_out(key, now):
            log.warning(
                "endpoint %s left a request unanswered for %.1fs; not routing to it for %gs",
                key,
                summary.duration_s,
                self.hold_s,
            )
        self._store.hold_out(key, now + self.hold_s)
