"""Realistic `/metrics` pages of vLLM and SGLang servers, written for these tests.

The shapes follow what the servers publish through prometheus_client: HELP/TYPE pairs,
`_created` series, histograms with their engine's bucket bounds, process and GC metrics,
and the info gauges whose labels carry the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

VLLM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SGLANG_MODEL = "Qwen/Qwen2.5-7B-Instruct"
CREATED = 1.7461392e09

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_TIME_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def _fmt(value: float) -> str:
    return repr(float(value)) if value == value else "NaN"


def _labels(pairs: dict[str, str]) -> str:
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return ",".join(f'{key}="{escape(value)}"' for key, value in pairs.items())


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _histogram(
    out: list[str],
    name: str,
    help_text: str,
    labels: dict[str, str],
    bounds: Sequence[float],
    observed: int,
) -> None:
    _family(out, name, "histogram", help_text)
    inner = _labels(labels)
    total = 0
    for i, bound in enumerate(bounds):
        total = min(observed, observed * (i + 1) // max(1, len(bounds) // 2))
        out.append(f'{name}_bucket{{{inner},le="{float(bound)}"}} {float(total)}')
    out.append(f'{name}_bucket{{{inner},le="+Inf"}} {float(observed)}')
    out.append(f"{name}_count{{{inner}}} {float(observed)}")
    out.append(f"{name}_sum{{{inner}}} {observed * 0.137:.6f}")
    _family(out, f"{name}_created", "gauge", help_text)
    out.append(f"{name}_created{{{inner}}} {CREATED}")


def _process_metrics(out: list[str]) -> None:
    _family(out, "python_gc_objects_collected_total", "counter", "Objects collected during gc")
    for gen, count in (("0", 17825.0), ("1", 4312.0), ("2", 998.0)):
        out.append(f'python_gc_objects_collected_total{{generation="{gen}"}} {count}')
    _family(out, "python_info", "gauge", "Python platform information")
    out.append(
        'python_info{implementation="CPython",major="3",minor="12",'
        'patchlevel="9",version="3.12.9"} 1.0'
    )
    _family(out, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
    out.append("process_virtual_memory_bytes 6.2318702592e+010")
    _family(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
    out.append("process_resident_memory_bytes 3.915038720e+09")
    _family(out, "process_open_fds", "gauge", "Number of open file descriptors.")
    out.append("process_open_fds 71.0")


def vllm_page(
    *,
    waiting: float = 0,
    running: float = 0,
    kv_usage: float = 0.0,
    kv_metric: str = "vllm:kv_cache_usage_perc",
    lora_series: Sequence[tuple[str, str, int, float]] = (),
    block_size: str = "16",
    num_gpu_blocks: str = "27919",
    model: str = VLLM_MODEL,
    engines: Sequence[str] = ("0",),
    observed: int = 1234,
) -> str:
    """A vLLM (V1 engine) page. `lora_series` = (running, waiting, max_lora, timestamp)."""
    out: list[str] = []
    _process_metrics(out)
    per_engine = [{"engine": engine, "model_name": model} for engine in engines]
    _family(
        out, "vllm:num_requests_running", "gauge", "Number of requests in model execution batches."
    )
    for labels in per_engine:
        out.append(f"vllm:num_requests_running{{{_labels(labels)}}} {_fmt(running)}")
    _family(
        out, "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."
    )
    for labels in per_engine:
        out.append(f"vllm:num_requests_waiting{{{_labels(labels)}}} {_fmt(waiting)}")
    if lora_series:
        _family(out, "vllm:lora_requests_info", "gauge", "Running stats on lora requests.")
        for run, wait, max_lora, stamp in lora_series:
            labels = {
                "max_lora": str(max_lora),
                "running_lora_adapters": run,
                "waiting_lora_adapters": wait,
            }
            out.append(f"vllm:lora_requests_info{{{_labels(labels)}}} {stamp!r}")
    _family(out, kv_metric, "gauge", "KV-cache usage. 1 means 100 percent usage.")
    for labels in per_engine:
        out.append(f"{kv_metric}{{{_labels(labels)}}} {_fmt(kv_usage)}")
    for counter, help_text in (
        ("vllm:prefix_cache_queries", "Prefix cache queries, in number of queried tokens."),
        ("vllm:prefix_cache_hits", "Prefix cache hits, in number of cached tokens."),
        ("vllm:num_preemptions", "Cumulative number of preemption from the engine."),
        ("vllm:prompt_tokens", "Number of prefill tokens processed."),
        ("vllm:generation_tokens", "Number of generation tokens processed."),
    ):
        _family(out, f"{counter}_total", "counter", help_text)
        for labels in per_engine:
            out.append(f"{counter}_total{{{_labels(labels)}}} {observed * 97.0}")
        _family(out, f"{counter}_created", "gauge", help_text)
        for labels in per_engine:
            out.append(f"{counter}_created{{{_labels(labels)}}} {CREATED}")
    _family(out, "vllm:request_success_total", "counter", "Count of processed requests.")
    for labels in per_engine:
        for reason in ("stop", "length", "abort"):
            out.append(
                f'vllm:request_success_total{{{_labels(labels)},finished_reason="{reason}"}}'
                f" {float(observed // 3)}"
            )
    labels = per_engine[0]
    for name, help_text, bounds in (
        ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", _TOKEN_BUCKETS),
        (
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            _TOKEN_BUCKETS,
        ),
        (
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
        ),
        (
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _TTFT_BUCKETS,
        ),
        (
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            _ITL_BUCKETS,
        ),
        (
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            _REQUEST_TIME_BUCKETS,
        ),
        (
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase.",
            _REQUEST_TIME_BUCKETS,
        ),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase.",
            _REQUEST_TIME_BUCKETS,
        ),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase.",
            _REQUEST_TIME_BUCKETS,
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase.",
            _REQUEST_TIME_BUCKETS,
        ),
    ):
        _histogram(out, name, help_text, labels, bounds, observed)
    _family(out, "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
    info = {
        "block_size": block_size,
        "cache_dtype": "auto",
        "calculate_kv_scales": "False",
        "cpu_offload_gb": "0",
        "enable_prefix_caching": "True",
        "engine": "0",
        "gpu_memory_utilization": "0.9",
        "is_attention_free": "False",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": num_gpu_blocks,
        "num_gpu_blocks_override": "None",
        "prefix_caching_hash_algo": "builtin",
        "sliding_window": "None",
        "swap_space": "4",
        "swap_space_bytes": "4294967296",
    }
    out.append(f"vllm:cache_config_info{{{_labels(info)}}} 1.0")
    return "\n".join(out) + "\n"


def sglang_page(
    *,
    queue: float = 0,
    running: float = 0,
    token_usage: float = 0.0,
    page_size: str = "1",
    num_pages: str = "412345",
    model: str = SGLANG_MODEL,
) -> str:
    out: list[str] = []
    _process_metrics(out)
    labels = {"model_name": model}
    inner = _labels(labels)
    for name, kind, help_text, value in (
        ("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.", 91234.0),
        (
            "sglang:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            412331.0,
        ),
        ("sglang:num_running_reqs", "gauge", "The number of running requests.", running),
        ("sglang:num_used_tokens", "gauge", "The number of used tokens.", 1234.0),
        ("sglang:token_usage", "gauge", "The token usage.", token_usage),
        ("sglang:gen_throughput", "gauge", "The generation throughput (token/s).", 812.4),
        ("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.", queue),
        ("sglang:cache_hit_rate", "gauge", "The prefix cache hit rate.", 0.41),
    ):
        _family(out, name, kind, help_text)
        out.append(f"{name}{{{inner}}} {_fmt(value)}")
    _histogram(
        out,
        "sglang:time_to_first_token_seconds",
        "Histogram of time to first token.",
        labels,
        _TTFT_BUCKETS,
        321,
    )
    _histogram(
        out,
        "sglang:e2e_request_latency_seconds",
        "Histogram of E2E request latency.",
        labels,
        _REQUEST_TIME_BUCKETS,
        321,
    )
    _family(out, "sglang:cache_config_info", "gauge", "Information about the cache config.")
    out.append(f'sglang:cache_config_info{{num_pages="{num_pages}",page_size="{page_size}"}} 1.0')
    return "\n".join(out) + "\n"
