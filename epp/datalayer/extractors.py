"""`core-metrics-extractor`: the engine metrics every scheduler plugin reads.

The extractor maps a model server's Prometheus page onto the load fields of
:class:`~epp.datalayer.endpoint_metrics.EndpointMetrics`. Engines name their metrics
differently, so which metric feeds which field comes from a per-engine table
(:data:`DEFAULT_ENGINE_METRICS`, replaceable per engine by the `engines` parameter) keyed by the
endpoint's `engine` (pod label `inference.networking.k8s.io/engine-type`, default `vllm`).
An engine missing from the table is read with the default engine's names, and that is
logged once.

What happens when a metric is not on the page:

* waiting / running / KV usage: the previous value stays (0 before the first success).
  If all three are missing the page is not this engine's (wrong engine label, wrong
  port, server still starting) and the extractor raises `ExtractError`, so the tick
  fails and the endpoint goes stale instead of looking idle.
* LoRA info: no series means the server has no LoRA adapters: empty sets, max 0
  (vLLM publishes `vllm:lora_requests_info` only with LoRA enabled; SGLang has none).
  The newest series says which adapters have requests now; every series, old ones
  included, says which adapters the server has served (`served_adapters`).
  An absent series is looked for again every ABSENT_RECHECK_TICKS ticks, not every tick.
* cache info: the previous value stays (it is static configuration; 0 = unknown); once
  read it is refreshed every STATIC_REFRESH_TICKS ticks.

A missing metric is counted in `missing` (by `<engine>/<field>`) and logged at debug once
per endpoint and field, never once per tick. Several series of one metric (a server
running several data-parallel engines behind one port) are combined: queue lengths are
summed, KV usage is averaged. NaN and infinite values count as missing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from epp import parameters
from epp.datalayer import interfaces, prometheus_text
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import DEFAULT_ENGINE, Endpoint, EndpointKey

logger = logging.getLogger(__name__)

CORE_METRICS_EXTRACTOR: Final = "core-metrics-extractor"
_LOGGED_LIMIT: Final = 10_000
# Pages are read every 50 ms, and a metric that is not on the page costs a scan of the
# whole page (~6 µs for vLLM's 32 KB), as does the cache-info line at its end. Static or
# absent series need not be looked up on every tick: cache geometry, once read, is read
# again every STATIC_REFRESH_TICKS ticks; a LoRA series that is absent (server without
# LoRA) is looked for again every ABSENT_RECHECK_TICKS ticks (1 s at 50 ms).
STATIC_REFRESH_TICKS: Final = 100
ABSENT_RECHECK_TICKS: Final = 20


@dataclass(frozen=True, slots=True)
class EngineMetricNames:
    """Where one engine publishes the core metrics. For tuples, the first name present wins."""

    waiting: tuple[str, ...]
    running: tuple[str, ...]
    kv_usage: tuple[str, ...]  # a fraction 0..1
    lora_info: str | None = None  # vLLM-style: value = timestamp, adapters in labels
    cache_info: str | None = None  # an info gauge whose labels carry the numbers
    cache_block_size_label: str = "block_size"
    cache_num_blocks_label: str = "num_gpu_blocks"


VLLM_METRICS: Final = EngineMetricNames(
    waiting=("vllm:num_requests_waiting",),
    running=("vllm:num_requests_running",),
    # Older vLLM versions published the same fraction under the GPU-specific name.
    kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    lora_info="vllm:lora_requests_info",
    cache_info="vllm:cache_config_info",
    cache_block_size_label="block_size",
    cache_num_blocks_label="num_gpu_blocks",
)

SGLANG_METRICS: Final = EngineMetricNames(
    waiting=("sglang:num_queue_reqs",),
    running=("sglang:num_running_reqs",),
    kv_usage=("sglang:token_usage",),
    cache_info="sglang:cache_config_info",
    cache_block_size_label="page_size",
    cache_num_blocks_label="num_pages",
)

DEFAULT_ENGINE_METRICS: Final[Mapping[str, EngineMetricNames]] = MappingProxyType(
    {"vllm": VLLM_METRICS, "sglang": SGLANG_METRICS}
)

_NO_ADAPTERS: Final[frozenset[str]] = frozenset()


@functools.lru_cache(maxsize=512)
def _adapter_set(text: str) -> frozenset[str]:
    """`"a,b, c"` -> {"a", "b", "c"}; cached because the same strings repeat every tick."""
    return frozenset(part for part in (p.strip() for p in text.split(",")) if part)


def _values(page: prometheus_text.MetricsPage, names: tuple[str, ...]) -> list[float] | None:
    for name in names:
        values = [s.value for s in page.samples(name) if math.isfinite(s.value)]
        if values:
            return values
    return None


_MAX_SERVED_MODELS: Final = 64  # per endpoint: a server's labels are not a memory sink


def _served_models(page: prometheus_text.MetricsPage, names: EngineMetricNames) -> frozenset[str]:
    """The `model_name` label values of the queue metrics: the models the server serves."""
    found: set[str] = set()
    for name in (*names.waiting, *names.running):
        for sample in page.samples(name):
            model = sample.labels.get("model_name")
            if model:
                found.add(model)
                if len(found) >= _MAX_SERVED_MODELS:
                    return frozenset(found)
    return frozenset(found)


def _int_label(labels: Mapping[str, str], key: str) -> int | None:
    text = labels.get(key)
    if text is None:
        return None
    try:
        number = float(text)  # servers print both "16" and "16.0"
    except ValueError:
        return None  # e.g. vLLM's num_gpu_blocks="None" before memory profiling
    if not math.isfinite(number) or number < 0:
        return None
    return int(number)


class CoreMetricsExtractor:
    """Queue lengths, KV usage, LoRA adapters and KV-cache geometry of an endpoint."""

    type_name: Final = CORE_METRICS_EXTRACTOR
    input_type: Final = prometheus_text.MetricsPage

    def __init__(
        self,
        name: str = CORE_METRICS_EXTRACTOR,
        *,
        engines: Mapping[str, EngineMetricNames] = DEFAULT_ENGINE_METRICS,
        default_engine: str = DEFAULT_ENGINE,
    ) -> None:
        if default_engine not in engines:
            raise ValueError(
                f"extractor '{name}': default engine {default_engine!r} has no metric "
                f"mapping (known engines: {', '.join(sorted(engines))})"
            )
        self._name = name
        self._engines = dict(engines)
        self._default_engine = default_engine
        self.missing: collections.Counter[str] = collections.Counter()
        """Ticks on which a metric was absent, by `<engine>/<field>`."""
        self._logged: set[tuple[EndpointKey, str]] = set()
        # Ticks left before a (endpoint, topic) lookup is due again; absent = due now.
        self._skip: dict[tuple[EndpointKey, str], int] = {}

    @property
    def name(self) -> str:
        return self._name

    def extract(
        self, payload: Any, endpoint: Endpoint, current: EndpointMetrics
    ) -> EndpointMetrics:
        page: prometheus_text.MetricsPage = payload
        names = self._engines.get(endpoint.engine)
        engine = endpoint.engine
        if names is None:
            self._once(
                endpoint,
                "engine",
                logging.WARNING,
                "endpoint %s has engine %r, which has no metric mapping (known: %s); "
                "reading it as %s",
                endpoint.key,
                engine,
                ", ".join(sorted(self._engines)),
                self._default_engine,
            )
            engine = self._default_engine
            names = self._engines[engine]

        waiting = _values(page, names.waiting)
        running = _values(page, names.running)
        kv_usage = _values(page, names.kv_usage)
        if waiting is None and running is None and kv_usage is None:
            raise interfaces.ExtractError(
                f"endpoint {endpoint.key}: none of {names.waiting[0]}, {names.running[0]}, "
                f"{names.kv_usage[0]} on its page; is it a {engine} server (pod label "
                f"inference.networking.k8s.io/engine-type) and is the metrics path right?"
            )
        changes: dict[str, Any] = {}
        if waiting is None:
            self._note_missing(endpoint, engine, "waiting", names.waiting)
        else:
            changes["waiting_queue_size"] = max(0, round(sum(waiting)))
        if running is None:
            self._note_missing(endpoint, engine, "running", names.running)
        else:
            changes["running_requests"] = max(0, round(sum(running)))
        if kv_usage is None:
            self._note_missing(endpoint, engine, "kv_usage", names.kv_usage)
        else:
            changes["kv_cache_usage"] = min(1.0, max(0.0, sum(kv_usage) / len(kv_usage)))
        key = endpoint.key
        if self._due(key, "models"):
            # Models change rarely; the labels are read every ABSENT_RECHECK_TICKS ticks.
            changes["served_models"] = _served_models(page, names)
            self._skip[(key, "models")] = ABSENT_RECHECK_TICKS
        if (
            names.lora_info is not None
            and self._due(key, "lora")
            and not self._read_lora(page, names.lora_info, changes)
        ):
            self._skip[(key, "lora")] = ABSENT_RECHECK_TICKS
        if (
            names.cache_info is not None
            and self._due(key, "cache")
            and self._read_cache_info(page, endpoint, engine, names, changes)
        ):
            self._skip[(key, "cache")] = STATIC_REFRESH_TICKS
        if page.errors:
            self._once(
                endpoint,
                "malformed",
                logging.DEBUG,
                "endpoint %s: skipped malformed metric lines, first: %s",
                endpoint.key,
                page.errors[0],
            )
        return dataclasses.replace(current, **changes)

    def _due(self, key: EndpointKey, topic: str) -> bool:
        skip = self._skip.get((key, topic))
        if not skip:
            return True
        if len(self._skip) >= _LOGGED_LIMIT:
            self._skip.clear()  # endpoints churned; at worst a lookup happens early
        self._skip[(key, topic)] = skip - 1
        return False

    def _read_lora(
        self, page: prometheus_text.MetricsPage, metric: str, changes: dict[str, Any]
    ) -> bool:
        """Fill the LoRA fields; False when the page has no such series."""
        latest: prometheus_text.Sample | None = None
        served: frozenset[str] = _NO_ADAPTERS
        for sample in page.samples(metric):
            if not math.isfinite(sample.value):
                continue
            # The value is the time the series was last updated; the newest one is current.
            if latest is None or sample.value > latest.value:
                latest = sample
            # Old series name adapters that are idle now but still served (vLLM keeps them).
            if len(served) < _MAX_SERVED_MODELS:
                served = served.union(
                    _adapter_set(sample.labels.get("running_lora_adapters", "")),
                    _adapter_set(sample.labels.get("waiting_lora_adapters", "")),
                )
        changes["served_adapters"] = served
        if latest is None:
            changes["running_adapters"] = _NO_ADAPTERS
            changes["waiting_adapters"] = _NO_ADAPTERS
            changes["max_adapters"] = 0
            return False
        labels = latest.labels
        changes["running_adapters"] = _adapter_set(labels.get("running_lora_adapters", ""))
        changes["waiting_adapters"] = _adapter_set(labels.get("waiting_lora_adapters", ""))
        changes["max_adapters"] = _int_label(labels, "max_lora") or 0
        return True

    def _read_cache_info(
        self,
        page: prometheus_text.MetricsPage,
        endpoint: Endpoint,
        engine: str,
        names: EngineMetricNames,
        changes: dict[str, Any],
    ) -> bool:
        assert names.cache_info is not None
        for sample in page.samples(names.cache_info):
            block_size = _int_label(sample.labels, names.cache_block_size_label)
            num_blocks = _int_label(sample.labels, names.cache_num_blocks_label)
            if block_size is not None and num_blocks is not None:
                changes["cache_block_size"] = block_size
                changes["cache_num_blocks"] = num_blocks
                return True
        self._note_missing(endpoint, engine, "cache_info", (names.cache_info,))
        return False

    def _note_missing(
        self, endpoint: Endpoint, engine: str, field: str, metrics: tuple[str, ...]
    ) -> None:
        self.missing[f"{engine}/{field}"] += 1
        self._once(
            endpoint,
            field,
            logging.DEBUG,
            "endpoint %s: %s not on its page; keeping the previous %s",
            endpoint.key,
            " or ".join(metrics),
            field,
        )

    def _once(
        self, endpoint: Endpoint, topic: str, level: int, message: str, *args: object
    ) -> None:
        key = (endpoint.key, topic)
        if key in self._logged:
            return
        if len(self._logged) >= _LOGGED_LIMIT:
            self._logged.clear()  # endpoints churned; at worst a note is logged again
        self._logged.add(key)
        logger.log(level, message, *args)


_ENGINE_KEYS: Final = (
    "waiting",
    "running",
    "kvUsage",
    "loraInfo",
    "cacheInfo",
    "cacheBlockSizeLabel",
    "cacheNumBlocksLabel",
)


def _names(value: object, key: str) -> tuple[str, ...]:
    """One metric name or a list of them (first present wins)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise parameters.ParameterError(
            key, f"must be a metric name or a non-empty list of metric names, got {value!r}"
        )
    return tuple(items)


def _engine_mapping(engine: str, raw: object) -> EngineMetricNames:
    where = f"engines.{engine}"
    if not isinstance(raw, Mapping):
        raise parameters.ParameterError(where, f"must be a mapping, got {raw!r}")
    unknown = parameters.unknown_key(raw, _ENGINE_KEYS)
    if unknown is not None:
        key, hint = unknown
        raise parameters.ParameterError(f"{where}.{key}", f"unknown key{hint}")
    for required in ("waiting", "running", "kvUsage"):
        if required not in raw:
            raise parameters.ParameterError(
                f"{where}.{required}",
                "required: an engine mapping names the waiting, running and kvUsage metrics",
            )

    def optional(key: str, default: str | None) -> str | None:
        value = raw.get(key, default)
        if value is not None and (not isinstance(value, str) or not value):
            raise parameters.ParameterError(f"{where}.{key}", f"must be a string, got {value!r}")
        return value

    block_label = optional("cacheBlockSizeLabel", "block_size")
    blocks_label = optional("cacheNumBlocksLabel", "num_gpu_blocks")
    assert block_label is not None and blocks_label is not None
    return EngineMetricNames(
        waiting=_names(raw["waiting"], f"{where}.waiting"),
        running=_names(raw["running"], f"{where}.running"),
        kv_usage=_names(raw["kvUsage"], f"{where}.kvUsage"),
        lora_info=optional("loraInfo", None),
        cache_info=optional("cacheInfo", None),
        cache_block_size_label=block_label,
        cache_num_blocks_label=blocks_label,
    )


def new_core_metrics_extractor(
    name: str, params: Mapping[str, object] | None = None
) -> CoreMetricsExtractor:
    """Registry factory. `engines` replaces (or adds) the mapping of the engines it names;
    the others keep :data:`DEFAULT_ENGINE_METRICS`. `defaultEngine` reads endpoints whose
    engine has no mapping."""
    reader = parameters.ParameterReader(params)
    default_engine = reader.string("defaultEngine", DEFAULT_ENGINE)
    engines = dict(DEFAULT_ENGINE_METRICS)
    raw = reader.mapping("engines")
    if raw is not None:
        if not raw:
            raise parameters.ParameterError(
                "engines", "must map at least one engine name to its metrics"
            )
        for engine, mapping in raw.items():
            engines[str(engine)] = _engine_mapping(str(engine), mapping)
    reader.finish()
    if default_engine not in engines:
        raise parameters.ParameterError(
            "defaultEngine",
            f"no metric mapping for {default_engine!r}; known engines: "
            f"{', '.join(sorted(engines))}",
        )
    return CoreMetricsExtractor(name, engines=engines, default_engine=default_engine)
