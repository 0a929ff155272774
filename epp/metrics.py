"""Prometheus metrics under the upstream endpoint picker's names.

All metrics live in one registry (`REGISTRY`) that the metrics server exposes; tests read
values back from it. Functions here are the only way the rest of the picker records
metrics, so names and label sets stay in one file.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epp import cardinality
from epp.histograms import BucketCounts, FastHistogram

REGISTRY = CollectorRegistry(auto_describe=True)

_OBJECTIVE_LABELS = ("model_name", "target_model_name", "priority")

_LATENCY_BUCKETS = (
    0.005,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    1.25,
    1.5,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    45,
    60,
    120,
    180,
    240,
    300,
    360,
    480,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
)
_TOKEN_BUCKETS = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32778,
    65536,
    131072,
    262144,
    524288,
    1048576,
)
_FAST_BUCKETS = (
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
)

request_total = Counter(
    "inference_objective_request_total",
    "Requests received, by model and objective priority.",
    _OBJECTIVE_LABELS,
    registry=REGISTRY,
)
request_error_total = Counter(
    "inference_objective_request_error_total",
    "Requests that ended in an error, by error code.",
    (*_OBJECTIVE_LABELS, "error_code"),
    registry=REGISTRY,
)
request_duration_seconds = FastHistogram(
    "inference_objective_request_duration_seconds",
    "End-to-end request latency seen by the picker.",
    _OBJECTIVE_LABELS,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
input_tokens = FastHistogram(
    "inference_objective_input_tokens",
    "Prompt tokens per request, from the response's usage.",
    _OBJECTIVE_LABELS,
    buckets=_TOKEN_BUCKETS,
    registry=REGISTRY,
)
output_tokens = FastHistogram(
    "inference_objective_output_tokens",
    "Completion tokens per request, from the response's usage.",
    _OBJECTIVE_LABELS,
    buckets=_TOKEN_BUCKETS,
    registry=REGISTRY,
)
running_requests = Gauge(
    "inference_objective_running_requests",
    "Requests currently in flight through the picker.",
    ("model_name",),
    registry=REGISTRY,
)
request_ttft_seconds = FastHistogram(
    "inference_objective_request_ttft_seconds",
    "Time to first token of streamed responses.",
    _OBJECTIVE_LABELS,
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
request_tpot_seconds = FastHistogram(
    "inference_objective_request_tpot_seconds",
    "Time per output token after the first.",
    _OBJECTIVE_LABELS,
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
pool_average_kv_cache_utilization = Gauge(
    "inference_pool_average_kv_cache_utilization",
    "Mean KV-cache utilisation over the pool's fresh endpoints.",
    ("name",),
    registry=REGISTRY,
)
pool_average_queue_size = Gauge(
    "inference_pool_average_queue_size",
    "Mean waiting-queue length over the pool's fresh endpoints.",
    ("name",),
    registry=REGISTRY,
)
pool_ready_pods = Gauge(
    "inference_pool_ready_pods",
    "Ready pods in the pool.",
    ("name",),
    registry=REGISTRY,
)
scheduler_e2e_duration_seconds = FastHistogram(
    "inference_extension_scheduler_e2e_duration_seconds",
    "Time spent in one scheduling cycle.",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
plugin_duration_seconds = FastHistogram(
    "inference_extension_plugin_duration_seconds",
    "Time spent in one plugin call.",
    ("extension_point", "plugin_type", "plugin_name"),
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)

config_reload_total = Counter(
    "config_reload_total",
    "EndpointPickerConfig reloads, by result (success: now in force; failure: rejected, "
    "the previous config stays).",
    ("result",),
    registry=REGISTRY,
)
scrape_total = Counter(
    "inference_extension_scrape_total",
    "Scrapes of model servers' metrics, all endpoints together, by result (success, failure).",
    ("result",),
    registry=REGISTRY,
)
request_body_bytes_held = Gauge(
    "inference_extension_request_body_bytes_held",
    "Bytes of request bodies the picker holds (received, not yet routed), all streams.",
    registry=REGISTRY,
)


# `labels()` costs microseconds per call; the hot path looks children up here instead.
_plugin_children: dict[tuple[str, str, str], BucketCounts] = {}


def observe_plugin_duration(
    extension_point: str, plugin_type: str, plugin_name: str, seconds: float
) -> None:
    key = (extension_point, plugin_type, plugin_name)
    child = _plugin_children.get(key)
    if child is None:
        child = _plugin_children[key] = plugin_duration_seconds.labels(*key)
    child.observe(seconds)


@dataclass(frozen=True, slots=True)
class ObjectiveSeries:
    """The per-(model, target model, priority) children a request records into."""

    requests: Counter
    duration: BucketCounts
    input_tokens: BucketCounts
    output_tokens: BucketCounts
    ttft: BucketCounts
    tpot: BucketCounts


ObjectiveLabels = tuple[str, str, str]

# Client-chosen label values, bounded (see epp/cardinality.py). Each objective label set
# costs ~140 series (five histograms); each error label set one.
MAX_OBJECTIVE_LABEL_SETS = 64
MAX_ERROR_LABEL_SETS = 256
MAX_WORKLOAD_SERIES = 256

known_models = cardinality.KnownModels()
_objective_sets = cardinality.LabelSets(
    MAX_OBJECTIVE_LABEL_SETS, (cardinality.OVERFLOW, cardinality.OVERFLOW, cardinality.OVERFLOW)
)
_error_sets = cardinality.LabelSets(MAX_ERROR_LABEL_SETS, (cardinality.OVERFLOW,) * 4)
_objective_children: dict[ObjectiveLabels, ObjectiveSeries] = {}

labels_overflow_total = Counter(
    "inference_extension_metric_labels_overflow_total",
    "Label values folded into `other` because the picker does not know the model, or "
    "because the limit of live label sets of that kind was reached.",
    ("kind",),
    registry=REGISTRY,
)
_MODEL_OVERFLOW = labels_overflow_total.labels("model")
_OBJECTIVE_OVERFLOW = labels_overflow_total.labels("objective")
_ERROR_OVERFLOW = labels_overflow_total.labels("error")
WORKLOAD_OVERFLOW = labels_overflow_total.labels("workload")


def objective_labels(model: str, target_model: str, priority: str) -> ObjectiveLabels:
    """The labels a request records under: unknown models folded, the set admitted."""
    known = known_models
    model_label = known.label(model) if model else model
    target_label = known.label(target_model) if target_model else target_model
    if model_label is not model or target_label is not target_model:
        _MODEL_OVERFLOW.inc()
    labels = (model_label, target_label, priority)
    admitted = _objective_sets.admit(labels, time.monotonic())
    if admitted is not labels:
        _OBJECTIVE_OVERFLOW.inc()
    return admitted  # type: ignore[return-value]  # admit returns a set it was given


def objective_series(labels: ObjectiveLabels) -> ObjectiveSeries:
    """The children of an admitted label set (from `objective_labels`)."""
    series = _objective_children.get(labels)
    if series is None:
        series = _objective_children[labels] = ObjectiveSeries(
            requests=request_total.labels(*labels),
            duration=request_duration_seconds.labels(*labels),
            input_tokens=input_tokens.labels(*labels),
            output_tokens=output_tokens.labels(*labels),
            ttft=request_ttft_seconds.labels(*labels),
            tpot=request_tpot_seconds.labels(*labels),
        )
    return series


def count_error(labels: ObjectiveLabels, code: str) -> None:
    """One request ended in error `code` (the picker's own codes, or `upstream_error_code`)."""
    full = (*labels, code)
    admitted = _error_sets.admit(full, time.monotonic())
    if admitted is not full:
        _ERROR_OVERFLOW.inc()
    request_error_total.labels(*admitted).inc()


def remove_idle_series(now: float, idle_s: float = cardinality.SERIES_IDLE_S) -> int:
    """Remove the series of label sets unused for `idle_s`; returns how many sets went."""
    gone = _objective_sets.idle(now, idle_s)
    for labels in gone:
        _objective_children.pop(labels, None)  # type: ignore[arg-type]
        with contextlib.suppress(KeyError):
            request_total.remove(*labels)
        for histogram in (
            request_duration_seconds,
            input_tokens,
            output_tokens,
            request_ttft_seconds,
            request_tpot_seconds,
        ):
            histogram.remove(*labels)
    live_models = {labels[0] for labels in _objective_children}
    for model in [m for m in _running_children if m not in live_models]:
        del _running_children[model]
        with contextlib.suppress(KeyError):
            running_requests.remove(model)
    errors_gone = _error_sets.idle(now, idle_s)
    for labels in errors_gone:
        with contextlib.suppress(KeyError):
            request_error_total.remove(*labels)
    return len(gone) + len(errors_gone)


_running_children: dict[str, Gauge] = {}


def running_gauge(model_label: str) -> Gauge:
    """The in-flight gauge of a model label from `objective_labels`."""
    gauge = _running_children.get(model_label)
    if gauge is None:
        gauge = _running_children[model_label] = running_requests.labels(model_label)
    return gauge


def observe_scheduler_duration(seconds: float) -> None:
    scheduler_e2e_duration_seconds.observe(seconds)


# ---- flow control and workloads ----------------------------------------------------

# Gauges, not counters: a counter would be exposed as `workload_total_requests_total`, and
# the series is dropped when an idle workload is forgotten anyway.
workload_total_requests = Gauge(
    "workload_total_requests",
    "Requests seen per workload since it became known.",
    ("workload_id",),
    registry=REGISTRY,
)
workload_active_requests = Gauge(
    "workload_active_requests",
    "Requests of a workload queued or in flight.",
    ("workload_id",),
    registry=REGISTRY,
)
workload_request_rate = Gauge(
    "workload_request_rate",
    "Requests per second of a workload over the sliding window.",
    ("workload_id",),
    registry=REGISTRY,
)
workload_context_invalid_total = Counter(
    "workload_context_invalid_total",
    "Requests whose X-Workload-Context header was unusable (they run as `default`).",
    ("reason",),
    registry=REGISTRY,
)
slo_header_invalid_total = Counter(
    "inference_extension_slo_header_invalid_total",
    "Requests whose latency-objective header was unusable (treated as absent).",
    ("header",),
    registry=REGISTRY,
)
flow_control_queue_size = Gauge(
    "inference_extension_flow_control_queue_size",
    "Requests waiting in flow control, by priority band.",
    ("priority",),
    registry=REGISTRY,
)
flow_control_queue_bytes = Gauge(
    "inference_extension_flow_control_queue_bytes",
    "Request body bytes waiting in flow control, by priority band.",
    ("priority",),
    registry=REGISTRY,
)
flow_control_request_queue_duration_seconds = Histogram(
    "inference_extension_flow_control_request_queue_duration_seconds",
    "Time a request spent in flow control, by how it left (dispatched, rejected, evicted...).",
    ("priority", "outcome"),
    buckets=(*_FAST_BUCKETS, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0),
    registry=REGISTRY,
)
flow_control_pool_saturation = Gauge(
    "inference_extension_flow_control_pool_saturation",
    "Pool saturation as the flow controller's detector sees it (>= 1: saturated).",
    registry=REGISTRY,
)

# ---- SLO-aware routing and the latency predictor -----------------------------------

scheduler_profile_total = Counter(
    "inference_extension_scheduler_profile_total",
    "Requests by the scheduling profile whose result routed them.",
    ("profile",),
    registry=REGISTRY,
)
latency_predicted_ttft_seconds = FastHistogram(
    "inference_extension_latency_predicted_ttft_seconds",
    "Predicted time to first token of requests that got a measured one (warm predictor).",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
latency_actual_ttft_seconds = FastHistogram(
    "inference_extension_latency_actual_ttft_seconds",
    "Measured time to first token, as the latency predictor learns it.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
latency_predicted_tpot_seconds = FastHistogram(
    "inference_extension_latency_predicted_tpot_seconds",
    "Predicted time per output token of requests that got a measured one (warm predictor).",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
latency_actual_tpot_seconds = FastHistogram(
    "inference_extension_latency_actual_tpot_seconds",
    "Measured time per output token, as the latency predictor learns it.",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
latency_prediction_duration_seconds = FastHistogram(
    "inference_extension_latency_prediction_duration_seconds",
    "Time to predict every candidate of one request.",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
slo_violations_total = Counter(
    "inference_extension_slo_violations_total",
    "Requests that carried a latency objective and missed it, by objective (ttft, tpot).",
    ("type",),
    registry=REGISTRY,
)
latency_fallback_total = Counter(
    "inference_extension_latency_fallback_total",
    "Requests a latency or SLO scorer scored with the cold-start fallback (queue, KV cache "
    "and prefix), because its predictor had too few samples.",
    ("plugin",),
    registry=REGISTRY,
)
# Set by the trainer thread: prometheus_client's own types, which lock.
latency_predictor_samples = Gauge(
    "inference_extension_latency_predictor_samples",
    "Samples the latency predictor has learned from.",
    ("predictor",),
    registry=REGISTRY,
)
latency_predictor_warm = Gauge(
    "inference_extension_latency_predictor_warm",
    "1 when the latency predictor has enough samples to be used, else 0 (cold start).",
    ("predictor",),
    registry=REGISTRY,
)
latency_predictor_training_seconds = Histogram(
    "inference_extension_latency_predictor_training_seconds",
    "Time one training round of the latency predictor took (off the request path).",
    ("predictor",),
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
latency_predictor_last_training = Gauge(
    "inference_extension_latency_predictor_last_training_timestamp_seconds",
    "When the latency predictor last swapped in a new model (Unix time).",
    ("predictor",),
    registry=REGISTRY,
)

# Precise prefix routing: KV-cache events from the model servers and the picker's tokenizer.
kv_events_total = Counter(
    "inference_extension_kv_events_total",
    "KV-cache events from model servers by what applying them did: BlockStored, "
    "BlockRemoved, AllBlocksCleared; unknown (an event type the picker does not know, "
    "skipped), ignored (another cache medium or KV-cache group), orphaned (stored under a "
    "parent block the index does not know).",
    ("outcome",),
    registry=REGISTRY,
)
kv_event_messages_dropped_total = Counter(
    "inference_extension_kv_event_messages_dropped_total",
    "KV-event messages not applied, by reason: malformed (not a three-frame msgpack batch), "
    "unknown_topic (a collector socket got a topic naming no endpoint of the pool).",
    ("reason",),
    registry=REGISTRY,
)
kv_event_index_resets_total = Counter(
    "inference_extension_kv_event_index_resets_total",
    "Times a server's block index was emptied because its event stream had a gap (missed "
    "messages) or restarted (the sequence number went back).",
    ("reason",),
    registry=REGISTRY,
)
precise_prefix_approximate_total = Counter(
    "inference_extension_precise_prefix_approximate_total",
    "Requests a precise prefix producer matched with the approximate index instead, because "
    "their model has no tokenizer configured or its tokenizer could not be loaded.",
    ("plugin",),
    registry=REGISTRY,
)
