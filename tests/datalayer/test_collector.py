"""The collector against real HTTP servers on 127.0.0.x whose pages the tests control."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from epp import metrics
from epp.datalayer import collector as collecting
from epp.datalayer import extractors, interfaces, sources
from epp.datalayer.endpoint_metrics import NEVER_SCRAPED, EndpointMetrics, MetricsStore
from epp.datastore.snapshot import Endpoint, EndpointKey
from tests.datalayer import pages
from tests.datalayer.servers import FakeModelServer, eventually

INTERVAL_S = 0.01


def _endpoint(server: FakeModelServer, name: str, engine: str = "vllm") -> Endpoint:
    return Endpoint(
        key=EndpointKey(f"default/{name}-rank-0"),
        pod_name=name,
        namespace="default",
        address=server.host,
        port=server.port,
        engine=engine,
    )


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeModelServer] = []

    async def start(page: str, host: str = "127.0.0.1") -> FakeModelServer:
        server = FakeModelServer(page, host)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def store_and_collector() -> AsyncIterator[tuple[MetricsStore, collecting.Collector]]:
    store = MetricsStore()
    collector = collecting.Collector(
        store, interval_s=INTERVAL_S, timeout_s=0.5, max_backoff_s=0.05
    )
    await collector.start()
    yield store, collector
    await collector.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("scrape ")]


def _fresh(store: MetricsStore, key: EndpointKey, threshold_s: float = 1.0) -> bool:
    return not store.get(key).is_stale(time.monotonic(), threshold_s)


async def test_metrics_appear_change_go_stale_and_come_back(
    servers: Callable[..., Any], store_and_collector: tuple[MetricsStore, collecting.Collector]
) -> None:
    store, collector = store_and_collector
    server = await servers(pages.vllm_page(waiting=2, running=5, kv_usage=0.25))
    endpoint = _endpoint(server, "pod-a")
    collector.update_endpoints([endpoint])

    await eventually(lambda: store.get(endpoint.key).updated_at > 0, "first scrape")
    first = store.get(endpoint.key)
    assert (first.waiting_queue_size, first.running_requests) == (2, 5)
    assert first.kv_cache_usage == 0.25 and first.cache_num_blocks == 27919

    server.page = pages.vllm_page(waiting=9, running=1, kv_usage=0.75)
    await eventually(lambda: store.get(endpoint.key).waiting_queue_size == 9, "new numbers")
    assert store.get(endpoint.key).kv_cache_usage == 0.75

    await server.stop()
    status = collector.status(endpoint.key)
    assert status is not None
    await eventually(lambda: status.consecutive_failures >= 2, "failed scrapes")
    kept = store.get(endpoint.key)
    assert kept.waiting_queue_size == 9  # the last known values stay ...
    await eventually(lambda: not _fresh(store, endpoint.key, 0.1), "staleness")  # ... and age
    assert store.get(endpoint.key).updated_at == kept.updated_at
    assert status.last_error.startswith("metrics-data-source: GET http://127.0.0.1:")

    server.page = pages.vllm_page(waiting=1)
    await server.start()  # same port
    await eventually(lambda: _fresh(store, endpoint.key, 0.1), "recovery")
    assert store.get(endpoint.key).waiting_queue_size == 1
    assert status.consecutive_failures == 0 and status.failures >= 2


async def test_http_errors_back_off_instead_of_spinning(
    servers: Callable[..., Any], store_and_collector: tuple[MetricsStore, collecting.Collector]
) -> None:
    store, collector = store_and_collector
    server = await servers("")
    server.status = 500
    endpoint = _endpoint(server, "pod-a")
    collector.update_endpoints([endpoint])
    await server.wait_requests(7)
    gaps = [b - a for a, b in zip(server.request_times, server.request_times[1:], strict=False)]
    # Backoff after 1..6 failures: 10, 20, 40, 50, 50, 50 ms (capped at max_backoff_s).
    assert min(gaps[3:6]) >= 0.035, gaps
    status = collector.status(endpoint.key)
    assert status is not None and "HTTP 500" in status.last_error
    assert store.get(endpoint.key) is NEVER_SCRAPED


async def test_a_hanging_endpoint_does_not_delay_the_others(
    servers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=collecting.__name__)
    hanging = await servers(pages.vllm_page())
    hanging.hang = True
    healthy = await servers(pages.vllm_page(waiting=4), host="127.0.0.2")
    store = MetricsStore()
    collector = collecting.Collector(store, interval_s=INTERVAL_S, timeout_s=0.2)
    slow, fast = _endpoint(hanging, "slow"), _endpoint(healthy, "fast")
    collector.update_endpoints([slow, fast])
    await collector.start()
    try:
        await hanging.wait_requests(1)
        started = healthy.requests
        await healthy.wait_requests(started + 10, timeout_s=1.0)  # while `slow` hangs
        assert store.get(fast.key).waiting_queue_size == 4
        status = collector.status(slow.key)
        assert status is not None
        await eventually(lambda: status.failures >= 1, "the hanging scrape to time out")
        assert "no answer within 0.2s" in status.last_error
        assert store.get(slow.key) is NEVER_SCRAPED
    finally:
        await collector.stop()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "default/slow-rank-0" in warnings[0].getMessage()


async def test_endpoints_added_and_removed_start_and_stop_loops(
    servers: Callable[..., Any], store_and_collector: tuple[MetricsStore, collecting.Collector]
) -> None:
    store, collector = store_and_collector
    server_a = await servers(pages.vllm_page(waiting=1))
    server_b = await servers(pages.vllm_page(waiting=2), host="127.0.0.3")
    a, b = _endpoint(server_a, "pod-a"), _endpoint(server_b, "pod-b")

    collector.update_endpoints([a])
    await eventually(lambda: _fresh(store, a.key), "pod-a scraped")
    assert server_b.requests == 0
    collector.update_endpoints([a, b])
    await eventually(lambda: _fresh(store, b.key), "pod-b scraped")
    assert collector.endpoint_keys == {a.key, b.key}

    collector.update_endpoints([b])
    assert collector.endpoint_keys == {b.key}
    assert store.get(a.key) is NEVER_SCRAPED  # forgotten at once
    asked = server_a.requests
    await server_b.wait_requests(server_b.requests + 5)
    assert server_a.requests <= asked + 1  # at most one request already on the wire
    assert store.get(a.key) is NEVER_SCRAPED  # and nothing written after removal
    assert collector.status(a.key) is None

    collector.update_endpoints([])
    assert store.items() == []


async def test_an_endpoint_that_moves_starts_from_scratch(
    servers: Callable[..., Any], store_and_collector: tuple[MetricsStore, collecting.Collector]
) -> None:
    store, collector = store_and_collector
    old = await servers(pages.vllm_page(waiting=5))
    new = await servers(pages.vllm_page(waiting=6))
    before = _endpoint(old, "pod-a")
    collector.update_endpoints([before])
    await eventually(lambda: store.get(before.key).waiting_queue_size == 5, "first address")
    after = Endpoint(
        key=before.key, pod_name="pod-a", namespace="default", address=new.host, port=new.port
    )
    collector.update_endpoints([after])
    assert store.get(before.key) is NEVER_SCRAPED
    await eventually(lambda: store.get(after.key).waiting_queue_size == 6, "new address")


async def test_sglang_endpoints_use_the_sglang_mapping(
    servers: Callable[..., Any], store_and_collector: tuple[MetricsStore, collecting.Collector]
) -> None:
    store, collector = store_and_collector
    vllm = await servers(pages.vllm_page(waiting=3, kv_usage=0.5))
    sglang = await servers(pages.sglang_page(queue=7, running=11, token_usage=0.9))
    v, s = _endpoint(vllm, "vllm-pod"), _endpoint(sglang, "sglang-pod", engine="sglang")
    collector.update_endpoints([v, s])
    await eventually(lambda: _fresh(store, v.key) and _fresh(store, s.key), "both scraped")
    got = store.get(s.key)
    assert (got.waiting_queue_size, got.running_requests, got.kv_cache_usage) == (7, 11, 0.9)
    assert (got.cache_block_size, got.cache_num_blocks) == (1, 412345)
    assert store.get(v.key).kv_cache_usage == 0.5

    summary = collecting.pool_summary(store, [v, s], time.monotonic(), 1.0)
    assert summary == collecting.PoolSummary(
        ready_pods=2,
        endpoints=2,
        fresh_endpoints=2,
        average_kv_cache_usage=pytest.approx(0.7),
        average_queue_size=5.0,
    )


async def test_a_wrongly_labelled_engine_fails_the_tick(
    servers: Callable[..., Any], store_and_collector: tuple[MetricsStore, collecting.Collector]
) -> None:
    store, collector = store_and_collector
    server = await servers(pages.sglang_page(queue=7))
    endpoint = _endpoint(server, "pod-a", engine="vllm")
    collector.update_endpoints([endpoint])
    status = collector.status(endpoint.key)
    assert status is not None
    await eventually(lambda: status.failures >= 1, "a failed tick")
    assert "engine-type" in status.last_error
    assert store.get(endpoint.key) is NEVER_SCRAPED


class _CountingExtractor:
    """Counts calls and records the payload object, to see that extractors share a fetch."""

    type_name = "counting-extractor"
    input_type = object

    def __init__(self, name: str, field: str) -> None:
        self.name = name
        self.field = field
        self.payloads: list[object] = []

    def extract(self, payload: Any, endpoint: Endpoint, current: EndpointMetrics) -> Any:
        self.payloads.append(payload)
        custom = {**current.custom, self.field: float(len(self.payloads))}
        return dataclasses.replace(current, custom=custom)


async def test_extractors_share_one_fetch_and_chain(servers: Callable[..., Any]) -> None:
    server = await servers(pages.vllm_page(waiting=8))
    source = sources.MetricsDataSource()
    first, second = _CountingExtractor("first", "x"), _CountingExtractor("second", "y")
    source.add_extractor(extractors.CoreMetricsExtractor())
    source.add_extractor(first)
    source.add_extractor(second)
    store = MetricsStore()
    collector = collecting.Collector(store, [source], interval_s=INTERVAL_S)
    endpoint = _endpoint(server, "pod-a")
    collector.update_endpoints([endpoint])  # before start(): loops begin on start()
    await collector.start()
    try:
        await eventually(lambda: len(second.payloads) >= 3, "three ticks")
    finally:
        await collector.stop()
    assert [id(p) for p in first.payloads] == [id(p) for p in second.payloads]
    assert len(first.payloads) <= server.requests <= len(first.payloads) + 1
    got = store.get(endpoint.key)
    assert got.waiting_queue_size == 8 and set(got.custom) == {"x", "y"}


async def test_a_crashing_extractor_does_not_end_the_loop(
    servers: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(_CountingExtractor):
        def extract(self, payload: Any, endpoint: Endpoint, current: EndpointMetrics) -> Any:
            super().extract(payload, endpoint, current)
            raise KeyError("bug")

    server = await servers(pages.vllm_page())
    source = sources.MetricsDataSource()
    broken = Broken("broken", "x")
    source.add_extractor(broken)
    store = MetricsStore()
    collector = collecting.Collector(store, [source], interval_s=INTERVAL_S, max_backoff_s=0.02)
    endpoint = _endpoint(server, "pod-a")
    await collector.start()
    collector.update_endpoints([endpoint])
    try:
        await eventually(lambda: len(broken.payloads) >= 3, "ticks after a crash")
    finally:
        await collector.stop()
    status = collector.status(endpoint.key)
    assert status is not None and status.last_error == "metrics-data-source: KeyError: 'bug'"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1


def test_sources_are_validated_when_the_collector_is_built() -> None:
    with pytest.raises(ValueError, match="has no extractors"):
        collecting.Collector(MetricsStore(), [sources.MetricsDataSource("bare")])

    class Mislabelled:
        type_name, name, output_type = "raw-data-source", "raw", bytes
        extractors = (extractors.CoreMetricsExtractor(),)

        def add_extractor(self, extractor: interfaces.Extractor) -> None: ...

        async def fetch(self, endpoint: Endpoint) -> Any: ...

        def forget(self, endpoint: Endpoint) -> None: ...

        def close(self) -> None: ...

    with pytest.raises(ValueError, match=r"produces builtins\.bytes"):
        collecting.Collector(MetricsStore(), [Mislabelled()])
    with pytest.raises(ValueError, match="must be positive"):
        collecting.Collector(MetricsStore(), interval_s=0)


def test_pool_summary_ignores_stale_endpoints() -> None:
    store = MetricsStore()
    endpoints = [
        Endpoint(
            key=EndpointKey(f"ns/p-rank-{i}"),
            pod_name="p",
            namespace="ns",
            address="127.0.0.1",
            port=8000 + i,
            rank=i,
        )
        for i in range(3)
    ]
    store.put(
        endpoints[0].key,
        EndpointMetrics(kv_cache_usage=0.2, waiting_queue_size=2, updated_at=100.0),
    )
    store.put(
        endpoints[1].key,
        EndpointMetrics(kv_cache_usage=0.9, waiting_queue_size=50, updated_at=90.0),
    )  # stale at now=100
    summary = collecting.pool_summary(store, endpoints, now=100.0, staleness_s=2.0)
    assert summary == collecting.PoolSummary(1, 3, 1, 0.2, 2.0)
    empty = collecting.pool_summary(store, [], now=100.0, staleness_s=2.0)
    assert empty == collecting.PoolSummary(0, 0, 0, 0.0, 0.0)


async def test_replace_sources_switches_on_the_next_tick_and_keeps_metrics(servers) -> None:
    server = await servers(pages.vllm_page(waiting=5))
    store = MetricsStore()
    first = sources.MetricsDataSource("first")
    first.add_extractor(extractors.CoreMetricsExtractor())
    collector = collecting.Collector(store, [first], interval_s=INTERVAL_S)
    endpoint = _endpoint(server, "a")
    await collector.start()
    try:
        collector.update_endpoints([endpoint])
        await eventually(lambda: store.get(endpoint.key).waiting_queue_size == 5, "a scrape")
        second = sources.MetricsDataSource("second", path="/v2/metrics")
        second.add_extractor(extractors.CoreMetricsExtractor())
        collector.replace_sources([second])
        assert collector.sources == (second,)
        assert store.get(endpoint.key).waiting_queue_size == 5  # kept across the swap
        await eventually(lambda: "/v2/metrics" in server.paths, "a scrape by the new source")
        before = len(server.paths)
        await server.wait_requests(before + 3)
        assert set(server.paths[before:]) == {"/v2/metrics"}  # the old source is gone
        with pytest.raises(ValueError, match="has no extractors"):
            collector.replace_sources([sources.MetricsDataSource("bare")])
        assert collector.sources == (second,)
    finally:
        await collector.stop()


async def test_sources_and_extractors_are_timed_per_plugin(servers) -> None:
    server = await servers(pages.vllm_page(waiting=1))
    source = sources.MetricsDataSource("timed-source")
    source.add_extractor(extractors.CoreMetricsExtractor("timed-core"))
    store = MetricsStore()
    collector = collecting.Collector(store, [source], interval_s=INTERVAL_S)
    endpoint = _endpoint(server, "t")
    await collector.start()
    try:
        collector.update_endpoints([endpoint])
        await eventually(lambda: store.get(endpoint.key).waiting_queue_size == 1, "a scrape")
    finally:
        await collector.stop()

    def count(point: str, type_name: str, name: str) -> float:
        labels = {"extension_point": point, "plugin_type": type_name, "plugin_name": name}
        value = metrics.REGISTRY.get_sample_value(
            "inference_extension_plugin_duration_seconds_count", labels
        )
        return value or 0.0

    assert count("DataSource", "metrics-data-source", "timed-source") >= 1
    assert count("Extractor", "core-metrics-extractor", "timed-core") >= 1
