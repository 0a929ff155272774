"""The flowControl / saturationDetector sections, the policies' parameters, the detector."""

from __future__ import annotations

import math
import time

import pytest

from epp.config import loader
from epp.datalayer.endpoint_metrics import EndpointLoad, EndpointMetrics
from epp.datastore.snapshot import Endpoint, EndpointKey
from epp.flowcontrol import settings
from epp.flowcontrol.fairness import RoundRobinFairnessPolicy
from epp.flowcontrol.interfaces import QueueItem
from epp.flowcontrol.ordering import DeadlineQueue, EdfOrderingPolicy
from epp.flowcontrol.saturation import UtilizationDetector
from epp.flowcontrol.workload import WorkloadId
from epp.flowcontrol.workload_aware import WorkloadAwareOrderingPolicy
from epp.scheduling.interfaces import Candidate, Filter, SchedulingRequest
from epp.scheduling.plugins.saturation_filter import SaturationFilter

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def load(body: str) -> settings.FlowControlSettings | None:
    return loader.load_config(HEAD + body).flow_control


def test_gate_off_means_no_flow_control() -> None:
    assert load("flowControl: {maxRequests: 5}\n") is None


def test_full_section() -> None:
    s = load(
        """
featureGates: [flowControl]
plugins:
- name: wa
  type: workload-aware-ordering-policy
  parameters:
    weights: {waitTime: 0.5, criticality: 0.3, requestRate: 0.2}
    waitTimeCap: 30s
    requestRateCap: 50
    slidingWindowDuration: 2m
    cleanupInterval: 1m
    idleTimeout: 10m
    defaultCriticality: 2
- name: rr
  type: round-robin-fairness-policy
saturationDetector: {queueDepthThreshold: 8, kvCacheUtilThreshold: 0.9,
                     metricsStalenessThreshold: 500ms}
flowControl:
  maxRequests: 1k
  maxBytes: 1Gi
  defaultRequestTTL: 30s
  retryAfter: 2s
  priorityBands:
  - priority: 10
    maxRequests: 100
    maxBytes: 10Mi
    saturationCeiling: 0.9
    orderingPolicyRef: edf-ordering-policy
"""
    )
    assert s is not None
    assert (s.max_requests, s.max_bytes, s.default_request_ttl_s, s.retry_after_s) == (
        1000,
        2**30,
        30.0,
        2,
    )
    band = s.band(10)
    assert isinstance(band.ordering, EdfOrderingPolicy)
    assert isinstance(band.fairness, RoundRobinFairnessPolicy)  # the one declared
    assert (band.max_requests, band.max_bytes, band.saturation_ceiling) == (100, 10 * 2**20, 0.9)
    default = s.band(3)
    assert isinstance(default.ordering, WorkloadAwareOrderingPolicy)  # the one declared
    w = s.workload
    assert (w.wait_weight, w.criticality_weight, w.wait_time_cap_s) == (0.5, 0.3, 30.0)
    assert (w.request_rate_cap, w.sliding_window_s, w.idle_timeout_s) == (50.0, 120.0, 600.0)
    assert (w.cleanup_interval_s, w.default_criticality) == (60.0, 2)
    detector = s.detector
    assert isinstance(detector, UtilizationDetector)
    assert (detector.queue_depth_threshold, detector.metrics_staleness_threshold_s) == (8, 0.5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "flowControl: {maxRequest: 5}",
            "unknown key 'maxRequest' in flowControl (did you mean 'maxRequests'?)",
        ),
        ("flowControl: {maxBytes: 10Gb}", "flowControl.maxBytes: expected a quantity"),
        ("flowControl: {defaultRequestTTL: soon}", "flowControl.defaultRequestTTL: expected"),
        ("flowControl: {retryAfter: 5}", "flowControl.retryAfter: '5' has no unit (write 5s or"),
        (
            "saturationDetector: {metricsStalenessThreshold: '0.2'}",
            "metricsStalenessThreshold: '0.2' has no unit (write 0.2s or 0.2ms)",
        ),
        (
            "flowControl: {priorityBands: [{priority: 1}, {priority: 1}]}",
            "priorityBands[1].priority: 1 is configured twice",
        ),
        (
            "flowControl: {priorityBands: [{orderingPolicyRef: fifo-ordering-policy}]}",
            "no plugin or policy type named 'fifo-ordering-policy' (did you mean "
            "'fcfs-ordering-policy'?)",
        ),
        (
            "flowControl: {priorityBands: [{fairnessPolicyRef: fcfs-ordering-policy}]}",
            "fairnessPolicyRef: no plugin or policy type named 'fcfs-ordering-policy'",
        ),
        (
            "flowControl: {priorityBands: [{saturationCeiling: 1.5}]}",
            "saturationCeiling: must be in (0, 1]",
        ),
        ("saturationDetector: {queueDepthThreshold: 0}", "queueDepthThreshold: must be at least"),
        ("saturationDetector: {kvCacheUtil: 0.5}", "kvCacheUtil: unknown parameter"),
        ("saturationDetector: {pluginRef: nothing}", "not a declared utilization-detector"),
    ],
)
def test_errors_name_the_path(body: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        load("featureGates: [flowControl]\n" + body + "\n")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("params", "where", "problem"),
    [
        ("{weights: {wait: 1}}", "weights.wait (", "unknown parameter (did you mean 'waitTime'?)"),
        ("{waitTimeCap: 0s}", "waitTimeCap (", "must be a positive duration"),
        ("{waitTimeCap: 60}", "waitTimeCap (", "'60' has no unit (write 60s or 60ms)"),
        ("{requestRateCap: 0}", "requestRateCap (", "must be greater than 0"),
        ("{defaultCriticality: 6}", "defaultCriticality (", "must be at most 5"),
        ("{weights: 3}", "weights (", "must be a mapping"),
    ],
)
def test_workload_aware_parameters_are_checked(params: str, where: str, problem: str) -> None:
    with pytest.raises(loader.ConfigError) as info:
        loader.load_config(
            HEAD + f"plugins:\n- type: workload-aware-ordering-policy\n  parameters: {params}\n"
        )
    assert f"plugins[0].parameters.{where}" in str(info.value)
    assert problem in str(info.value)


def metrics(waiting: int = 0, kv: float = 0.0, age_s: float = 0.0) -> EndpointMetrics:
    return EndpointMetrics(
        waiting_queue_size=waiting, kv_cache_usage=kv, updated_at=time.monotonic() - age_s
    )


def test_saturation_is_the_mean_of_the_worse_ratio() -> None:
    d = UtilizationDetector()  # Q 5, KV 0.8, staleness 200 ms
    now = time.monotonic()

    def pool(*items: EndpointMetrics) -> list[EndpointLoad]:
        return [EndpointLoad(m) for m in items]

    assert d.saturation([], now) == math.inf
    assert d.saturation(pool(metrics(waiting=5)), now) == 1.0
    assert d.saturation(pool(metrics(waiting=1, kv=0.4), metrics(waiting=0)), now) == 0.25
    assert d.saturation(pool(metrics(), metrics(age_s=5.0)), now) == 0.5  # stale counts 1.0
    assert d.saturation(pool(EndpointMetrics()), now) == 1.0  # never scraped
    # What the picker routed there since the scrape counts as waiting.
    assert d.saturation([EndpointLoad(metrics(waiting=2), 3)], now) == 1.0


def test_detector_as_a_scheduling_filter() -> None:
    d = SaturationFilter(UtilizationDetector())
    assert isinstance(d, Filter)

    def candidate(n: int, m: EndpointMetrics) -> Candidate:
        endpoint = Endpoint(EndpointKey(f"e{n}"), f"pod{n}", "ns", f"10.0.0.{n}", 8000)
        return Candidate(endpoint, m)

    full, free, stale = (
        candidate(1, metrics(waiting=9)),
        candidate(2, metrics()),
        candidate(3, metrics(age_s=9)),
    )
    request = SchedulingRequest("r", "m")
    assert list(d.filter(request, [full, free, stale])) == [free]
    assert list(d.filter(request, [full, stale])) == [full, stale]  # shedding is not its job


def test_edf_orders_by_deadline_and_puts_no_deadline_last() -> None:
    queue = DeadlineQueue()

    def item(seq: int, deadline: float) -> QueueItem:
        return QueueItem(
            request_id=str(seq),
            workload_id=WorkloadId("w"),
            criticality=3,
            fairness_id="w",
            priority=0,
            size_bytes=0,
            enqueued_at=0.0,
            deadline=deadline,
            seq=seq,
        )

    items = [item(1, math.inf), item(2, 30.0), item(3, 10.0), item(4, 20.0)]
    for i in items:
        queue.push(i, 0.0)
    queue.remove(items[3])
    assert [queue.pop(0.0) for _ in range(3)] == [items[2], items[1], items[0]]
    assert queue.pop(0.0) is None and len(queue) == 0


def test_utilization_detector_in_a_scheduling_profile() -> None:
    config = loader.load_config(
        HEAD
        + """
plugins:
- type: utilization-detector
  parameters: {queueDepthThreshold: 3}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: utilization-detector
  - pluginRef: queue-scorer
"""
    )
    profile = config.scheduler.profiles["default"]
    assert [f.name for f in profile.filters] == ["utilization-detector"]
