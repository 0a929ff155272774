"""vLLM's Prometheus metrics for one simulated server, rendered as text by hand.

A picker scrapes every 50 ms and a process may host many servers, so rendering must be
cheap: counters are plain numbers, histograms keep bucket counts in a list and cache
their rendered lines until the next observation. Names, types and label sets follow
vLLM's v1 engine (`model_name` label; `finished_reason` on request_success;
`vllm:cache_config_info` and `vllm:lora_requests_info` carry no model label, as in vLLM).
Histogram buckets are vLLM's.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

FINISH_REASONS = ("stop", "length", "abort")


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(labels: Mapping[str, str]) -> str:
    return ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())


def number(value: float) -> str:
    return repr(float(value))


class Histogram:
    __slots__ = ("_bounds", "_counts", "_labels", "_sum", "_text", "count", "name")

    def __init__(self, name: str, bounds: Sequence[float]) -> None:
        self.name = name
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self.count = 0
        self._text: str | None = None
        self._labels = ""

    @property
    def sum(self) -> float:
        return self._sum

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value
        self.count += 1
        self._text = None

    def render(self, labels: str) -> str:
        if self._text is None or labels != self._labels:
            self._labels = labels
            sep = "," if labels else ""
            lines = []
            cumulative = 0
            for bound, n in zip(self._bounds, self._counts, strict=False):
                cumulative += n
                lines.append(f'{self.name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}.0')
            lines.append(f'{self.name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}.0')
            lines.append(f"{self.name}_count{{{labels}}} {self.count}.0")
            lines.append(f"{self.name}_sum{{{labels}}} {number(self._sum)}")
            self._text = "\n".join(lines)
        return self._text


@dataclass(slots=True)
class VllmStats:
    """Cumulative counters and histograms, updated by the engine as it runs."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # tokens
    prefix_cache_hits: int = 0  # tokens
    preemptions: int = 0
    request_success: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0)
    )
    ttft: Histogram = field(
        default_factory=lambda: Histogram("vllm:time_to_first_token_seconds", TTFT_BUCKETS_S)
    )
    itl: Histogram = field(
        default_factory=lambda: Histogram("vllm:inter_token_latency_seconds", ITL_BUCKETS_S)
    )
    e2e: Histogram = field(
        default_factory=lambda: Histogram(
            "vllm:e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS_S
        )
    )
    queue_time: Histogram = field(
        default_factory=lambda: Histogram(
            "vllm:request_queue_time_seconds", REQUEST_LATENCY_BUCKETS_S
        )
    )


@dataclass(frozen=True, slots=True)
class LoraInfo:
    running: Sequence[str]
    waiting: Sequence[str]
    max_lora: int
    updated_at: float  # unix time of the last change, the series' value as in vLLM


@dataclass(frozen=True, slots=True)
class Gauges:
    running: int
    waiting: int
    kv_cache_usage: float  # fraction 0..1


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> str:
    return "\n".join((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples))


def render(
    stats: VllmStats,
    gauges: Gauges,
    *,
    model_name: str,
    cache_config: Mapping[str, str],
    lora: LoraInfo | None,
) -> bytes:
    m = label_text({"model_name": model_name})
    families = [
        _family(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            [f"vllm:num_requests_running{{{m}}} {number(gauges.running)}"],
        ),
        _family(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            [f"vllm:num_requests_waiting{{{m}}} {number(gauges.waiting)}"],
        ),
        _family(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            [f"vllm:kv_cache_usage_perc{{{m}}} {number(gauges.kv_cache_usage)}"],
        ),
        _family(
            "vllm:cache_config_info",
            "gauge",
            "Information of the LLMEngine CacheConfig",
            [f"vllm:cache_config_info{{{label_text(cache_config)}}} 1.0"],
        ),
    ]
    if lora is not None:
        labels = label_text(
            {
                "max_lora": str(lora.max_lora),
                "running_lora_adapters": ",".join(lora.running),
                "waiting_lora_adapters": ",".join(lora.waiting),
            }
        )
        families.append(
            _family(
                "vllm:lora_requests_info",
                "gauge",
                "Running stats on lora requests.",
                [f"vllm:lora_requests_info{{{labels}}} {number(lora.updated_at)}"],
            )
        )
    counters = (
        (
            "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats.prefix_cache_queries,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats.prefix_cache_hits,
        ),
        (
            "vllm:num_preemptions_total",
            "Cumulative number of preemption from the engine.",
            stats.preemptions,
        ),
        ("vllm:prompt_tokens_total", "Number of prefill tokens processed.", stats.prompt_tokens),
        (
            "vllm:generation_tokens_total",
            "Number of generation tokens processed.",
            stats.generation_tokens,
        ),
    )
    families.extend(
        _family(name, "counter", help_text, [f"{name}{{{m}}} {number(value)}"])
        for name, help_text, value in counters
    )
    families.append(
        _family(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            [
                f'vllm:request_success_total{{finished_reason="{reason}",{m}}} {number(n)}'
                for reason, n in stats.request_success.items()
            ],
        )
    )
    histograms = (
        (stats.ttft, "Histogram of time to first token in seconds."),
        (stats.itl, "Histogram of inter-token latency in seconds."),
        (stats.e2e, "Histogram of e2e request latency in seconds."),
        (stats.queue_time, "Histogram of time spent in WAITING phase for request."),
    )
    families.extend(
        _family(h.name, "histogram", help_text, [h.render(m)]) for h, help_text in histograms
    )
    families.append("")
    return "\n".join(families).encode()
