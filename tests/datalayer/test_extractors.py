from __future__ import annotations

import logging

import pytest

from epp.datalayer import extractors, interfaces
from epp.datalayer.endpoint_metrics import NEVER_SCRAPED, EndpointMetrics
from epp.datalayer.prometheus_text import MetricsPage
from epp.datastore.snapshot import Endpoint, EndpointKey
from tests.datalayer import pages


def _endpoint(engine: str = "vllm", name: str = "pod-a") -> Endpoint:
    return Endpoint(
        key=EndpointKey(f"default/{name}-rank-0"),
        pod_name=name,
        namespace="default",
        address="127.0.0.1",
        port=8000,
        engine=engine,
    )


def _extract(
    text: str, engine: str = "vllm", current: EndpointMetrics = NEVER_SCRAPED
) -> EndpointMetrics:
    return extractors.CoreMetricsExtractor().extract(MetricsPage(text), _endpoint(engine), current)


def test_vllm_core_metrics() -> None:
    metrics = _extract(pages.vllm_page(waiting=4, running=9, kv_usage=0.375))
    assert metrics.waiting_queue_size == 4
    assert metrics.running_requests == 9
    assert metrics.kv_cache_usage == 0.375
    assert metrics.cache_block_size == 16
    assert metrics.cache_num_blocks == 27919
    assert metrics.running_adapters == frozenset()
    assert metrics.max_adapters == 0
    assert metrics.updated_at == 0.0  # the collector stamps the time, not the extractor


def test_vllm_older_gpu_cache_metric_is_a_fallback() -> None:
    text = pages.vllm_page(kv_usage=0.8, kv_metric="vllm:gpu_cache_usage_perc")
    assert _extract(text).kv_cache_usage == 0.8


def test_vllm_lora_info_uses_the_newest_series() -> None:
    text = pages.vllm_page(
        lora_series=[
            ("old-adapter", "", 4, 1746139100.5),
            ("sql-lora,chat-lora", "tool-lora", 4, 1746139201.25),
            ("middle", "x", 2, 1746139150.0),
        ]
    )
    metrics = _extract(text)
    assert metrics.running_adapters == {"sql-lora", "chat-lora"}
    assert metrics.waiting_adapters == {"tool-lora"}
    assert metrics.max_adapters == 4


def test_adapters_of_old_lora_series_are_still_served() -> None:
    # What vLLM 0.32.0 shows after a request for sql-lora ended: the newest series is
    # empty, the one from while it ran is kept.
    text = pages.vllm_page(
        lora_series=[("sql-lora", "sql-lora", 2, 1746139100.5), ("", "chat-lora", 2, 1746139201.0)]
    )
    metrics = _extract(text)
    assert metrics.running_adapters == frozenset()
    assert metrics.served_adapters == {"sql-lora", "chat-lora"}
    assert _extract(pages.vllm_page(), current=metrics).served_adapters == frozenset()


def test_vllm_lora_info_with_empty_adapter_lists() -> None:
    metrics = _extract(pages.vllm_page(lora_series=[("", "", 8, 1746139201.0)]))
    assert metrics.running_adapters == frozenset()
    assert metrics.waiting_adapters == frozenset()
    assert metrics.max_adapters == 8


def test_lora_info_disappearing_clears_adapters() -> None:
    before = _extract(pages.vllm_page(lora_series=[("a", "b", 2, 1.0)]))
    after = _extract(pages.vllm_page(), current=before)
    assert after.running_adapters == frozenset() and after.max_adapters == 0


def test_data_parallel_series_are_combined() -> None:
    text = pages.vllm_page(waiting=2, running=3, kv_usage=0.5, engines=("0", "1", "2"))
    metrics = _extract(text)
    assert metrics.waiting_queue_size == 6
    assert metrics.running_requests == 9
    assert metrics.kv_cache_usage == 0.5


def test_out_of_range_values_are_clamped() -> None:
    metrics = _extract(pages.vllm_page(waiting=-3, kv_usage=1.7))
    assert metrics.waiting_queue_size == 0
    assert metrics.kv_cache_usage == 1.0


def test_sglang_mapping() -> None:
    metrics = _extract(pages.sglang_page(queue=12, running=30, token_usage=0.66), "sglang")
    assert metrics.waiting_queue_size == 12
    assert metrics.running_requests == 30
    assert metrics.kv_cache_usage == 0.66
    assert metrics.cache_block_size == 1
    assert metrics.cache_num_blocks == 412345
    assert metrics.running_adapters == frozenset()


def test_a_missing_metric_keeps_the_previous_value_and_is_counted_once_in_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    extractor = extractors.CoreMetricsExtractor()
    endpoint = _endpoint()
    previous = EndpointMetrics(
        waiting_queue_size=5,
        running_requests=2,
        kv_cache_usage=0.1,
        custom={"x": 1.0},
        updated_at=12.0,
    )
    text = pages.vllm_page(running=4, kv_usage=0.2).replace("vllm:num_requests_waiting", "gone")
    caplog.set_level(logging.DEBUG, logger=extractors.__name__)
    for _ in range(3):
        metrics = extractor.extract(MetricsPage(text), endpoint, previous)
    assert metrics.waiting_queue_size == 5
    assert metrics.running_requests == 4
    assert metrics.kv_cache_usage == 0.2
    assert metrics.custom == {"x": 1.0} and metrics.updated_at == 12.0  # carried over
    assert extractor.missing["vllm/waiting"] == 3
    notes = [r for r in caplog.records if "vllm:num_requests_waiting" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.DEBUG


def test_nan_counts_as_missing() -> None:
    previous = EndpointMetrics(kv_cache_usage=0.25)
    metrics = _extract(pages.vllm_page(kv_usage=float("nan")), current=previous)
    assert metrics.kv_cache_usage == 0.25


def test_cache_info_not_yet_known_keeps_previous() -> None:
    previous = EndpointMetrics(cache_block_size=16, cache_num_blocks=1000)
    metrics = _extract(pages.vllm_page(num_gpu_blocks="None"), current=previous)
    assert (metrics.cache_block_size, metrics.cache_num_blocks) == (16, 1000)


def test_a_page_without_any_core_metric_is_an_extract_error() -> None:
    # An sglang server labelled as vllm: nothing usable, so the tick must fail.
    with pytest.raises(interfaces.ExtractError, match="engine-type"):
        _extract(pages.sglang_page(queue=3), "vllm")


def test_unknown_engine_is_read_as_the_default_engine_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    extractor = extractors.CoreMetricsExtractor()
    endpoint = _endpoint("trtllm")
    caplog.set_level(logging.WARNING, logger=extractors.__name__)
    for _ in range(3):
        metrics = extractor.extract(
            MetricsPage(pages.vllm_page(waiting=7)), endpoint, NEVER_SCRAPED
        )
    assert metrics.waiting_queue_size == 7
    warnings = [r for r in caplog.records if "trtllm" in r.getMessage()]
    assert len(warnings) == 1


def test_the_engine_table_can_be_replaced() -> None:
    custom = extractors.EngineMetricNames(
        waiting=("my:queue",), running=("my:running",), kv_usage=("my:kv",)
    )
    extractor = extractors.CoreMetricsExtractor(engines={"mine": custom}, default_engine="mine")
    metrics = extractor.extract(
        MetricsPage("my:queue 3\nmy:running 1\nmy:kv 0.5\n"), _endpoint("mine"), NEVER_SCRAPED
    )
    assert (metrics.waiting_queue_size, metrics.running_requests) == (3, 1)
    with pytest.raises(ValueError, match="default engine 'vllm' has no metric mapping"):
        extractors.CoreMetricsExtractor(engines={"mine": custom})


def test_factory_rejects_unknown_parameters() -> None:
    assert extractors.new_core_metrics_extractor("core", None).name == "core"
    with pytest.raises(ValueError, match=r"engine: unknown parameter .did you mean 'engines'"):
        extractors.new_core_metrics_extractor("core", {"engine": "x"})


def test_absent_lora_series_is_looked_for_again_within_a_second() -> None:
    extractor = extractors.CoreMetricsExtractor()
    endpoint = _endpoint()
    metrics = extractor.extract(MetricsPage(pages.vllm_page()), endpoint, NEVER_SCRAPED)
    assert metrics.max_adapters == 0
    with_lora = MetricsPage(pages.vllm_page(lora_series=[("sql", "", 2, 1e9)]))
    ticks = 0
    while metrics.max_adapters == 0:
        metrics = extractor.extract(with_lora, endpoint, metrics)
        ticks += 1
        assert ticks <= extractors.ABSENT_RECHECK_TICKS + 1
    assert metrics.running_adapters == frozenset({"sql"})
    # Present: read on every tick, so a change shows at once.
    changed = MetricsPage(pages.vllm_page(lora_series=[("sql,chat", "", 2, 2e9)]))
    assert extractor.extract(changed, endpoint, metrics).running_adapters == {"sql", "chat"}


def test_cache_geometry_is_refreshed_periodically() -> None:
    extractor = extractors.CoreMetricsExtractor()
    endpoint = _endpoint()
    metrics = extractor.extract(MetricsPage(pages.vllm_page()), endpoint, NEVER_SCRAPED)
    assert metrics.cache_num_blocks == 27919
    resized = MetricsPage(pages.vllm_page(num_gpu_blocks="500"))
    for _ in range(extractors.STATIC_REFRESH_TICKS):
        metrics = extractor.extract(resized, endpoint, metrics)
        assert metrics.cache_num_blocks == 27919  # static: not re-read every tick
    metrics = extractor.extract(resized, endpoint, metrics)
    assert metrics.cache_num_blocks == 500
    # Another endpoint is read on its own schedule.
    other = extractor.extract(resized, _endpoint(name="pod-b"), NEVER_SCRAPED)
    assert other.cache_num_blocks == 500
