"""An endpoint whose requests end unanswered is held out of routing for a while."""

from __future__ import annotations

import time

from epp.datalayer.endpoint_metrics import EndpointMetrics, MetricsStore
from epp.datastore.snapshot import EndpointKey
from epp.requestcontrol.interfaces import ResponseSummary
from epp.requestcontrol.unanswered import UnansweredRequests

KEY = EndpointKey("default/pod-a-rank-0")


def summary(status: int, duration_s: float, streaming: bool = False) -> ResponseSummary:
    return ResponseSummary(
        status=status,
        streaming=streaming,
        completed=status != 0,
        usage=None,
        ttft_s=None,
        tpot_s=None,
        duration_s=duration_s,
    )


def fresh_store() -> MetricsStore:
    store = MetricsStore()
    store.put(KEY, EndpointMetrics(updated_at=time.monotonic()))
    return store


def test_a_request_left_unanswered_past_the_timeout_holds_the_endpoint_out():
    store = fresh_store()
    watch = UnansweredRequests(store, timeout_s=30.0, hold_s=10.0)
    now = time.monotonic()
    watch.request_ended(KEY, summary(0, 31.0))
    assert store.get(KEY).is_stale(now, threshold_s=60.0)
    assert not store.get(KEY).is_stale(now + 11.0, threshold_s=60.0)  # tried again later
    # A scrape landing meanwhile does not end the hold (the server may serve /metrics).
    store.put(KEY, EndpointMetrics(updated_at=time.monotonic()))
    assert store.get(KEY).is_stale(now + 1.0, threshold_s=60.0)


def test_envoys_timeout_counts_answers_and_quick_failures_do_not():
    store = fresh_store()
    watch = UnansweredRequests(store, timeout_s=30.0)
    now = time.monotonic()
    watch.request_ended(KEY, summary(200, 120.0))  # a long answer is an answer
    watch.request_ended(KEY, summary(0, 2.0))  # a client that left early
    watch.request_ended(KEY, summary(504, 45.0, streaming=True))  # a stream that stalled
    assert not store.get(KEY).is_stale(now, threshold_s=60.0)
    watch.request_ended(KEY, summary(504, 45.0))  # Envoy's timeout: nothing came back
    assert store.get(KEY).is_stale(now, threshold_s=60.0)
