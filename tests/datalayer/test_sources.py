"""`metrics-data-source` against real HTTP servers on 127.0.0.1, and its wiring rules."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from epp.datalayer import extractors, interfaces, sources
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datalayer.prometheus_text import MetricsPage
from epp.datastore.snapshot import Endpoint, EndpointKey
from tests.datalayer import pages
from tests.datalayer.servers import FakeModelServer


def _endpoint(address: str, port: int) -> Endpoint:
    return Endpoint(
        key=EndpointKey(f"default/pod-{port}-rank-0"),
        pod_name=f"pod-{port}",
        namespace="default",
        address=address,
        port=port,
    )


@pytest.fixture
async def server() -> AsyncIterator[FakeModelServer]:
    model_server = FakeModelServer(pages.vllm_page(waiting=3))
    await model_server.start()
    yield model_server
    await model_server.stop()


async def test_fetches_the_page_with_the_text_format_accept_header(server: FakeModelServer) -> None:
    source = sources.MetricsDataSource()
    page = await source.fetch(_endpoint("127.0.0.1", server.port))
    assert isinstance(page, MetricsPage)
    assert page.samples("vllm:num_requests_waiting")[0].value == 3.0
    assert server.paths == ["/metrics"]
    assert server.accept_headers == ["text/plain; version=0.0.4"]


async def test_custom_path_and_chunked_body(server: FakeModelServer) -> None:
    server.chunked = True
    source = sources.new_metrics_data_source("scrape", {"path": "/custom/metrics?x=1"})
    page = await source.fetch(_endpoint("127.0.0.1", server.port))
    assert page.text == server.page
    assert server.paths == ["/custom/metrics?x=1"]


async def test_non_200_is_a_fetch_error(server: FakeModelServer) -> None:
    server.status = 503
    source = sources.MetricsDataSource()
    with pytest.raises(interfaces.FetchError, match="HTTP 503"):
        await source.fetch(_endpoint("127.0.0.1", server.port))


async def test_refused_connection_is_a_fetch_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on once the socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = sources.MetricsDataSource()
    with pytest.raises(interfaces.FetchError, match=f"127.0.0.1:{port}/metrics"):
        await source.fetch(_endpoint("127.0.0.1", port))


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversized_body_is_a_fetch_error(server: FakeModelServer, chunked: bool) -> None:
    server.chunked = chunked
    source = sources.MetricsDataSource(max_body_bytes=1000)
    with pytest.raises(interfaces.FetchError, match="1000-byte limit"):
        await source.fetch(_endpoint("127.0.0.1", server.port))


def test_urls_bracket_ipv6() -> None:
    source = sources.MetricsDataSource(scheme="https", path="/m")
    v6 = _endpoint("fd00::1", 8000)
    assert source.url_for(v6) == "https://[fd00::1]:8000/m"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"scheme": "ftp"}, "scheme: must be 'http' or 'https'"),
        ({"path": "metrics"}, "path: must start with '/'"),
        ({"pathh": "/m"}, r"pathh: unknown parameter .did you mean 'path'"),
        ({"insecureSkipVerify": "yes"}, "insecureSkipVerify: must be true or false"),
        ({"maxBodyBytes": True}, "maxBodyBytes: must be an integer"),
    ],
)
def test_factory_rejects_bad_parameters(parameters: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sources.new_metrics_data_source("scrape", parameters)


def test_both_type_names_are_known() -> None:
    assert sources.TYPE_NAMES == ("metrics-data-source", "prometheus-data-source")
    assert sources.new_metrics_data_source("p", None).type_name == "metrics-data-source"


class _JsonSource:
    type_name = "json-data-source"
    name = "json"
    output_type = dict
    extractors: tuple[interfaces.Extractor, ...] = ()

    def add_extractor(self, extractor: interfaces.Extractor) -> None:
        interfaces.check_wiring(self, extractor)

    async def fetch(self, endpoint: Endpoint) -> Any:
        return {}

    def forget(self, endpoint: Endpoint) -> None:
        pass

    def close(self) -> None:
        pass


class _TextExtractor:
    type_name = "text-extractor"
    name = "words"
    input_type = str

    def extract(self, payload: Any, endpoint: Endpoint, current: EndpointMetrics) -> Any:
        return current


def test_wiring_an_extractor_to_a_source_of_another_payload_type_is_an_error() -> None:
    with pytest.raises(ValueError) as caught:
        _JsonSource().add_extractor(extractors.CoreMetricsExtractor("core"))
    message = str(caught.value)
    for part in (
        "'core'",
        "core-metrics-extractor",
        "MetricsPage",
        "'json'",
        "json-data-source",
        "builtins.dict",
    ):
        assert part in message
    with pytest.raises(ValueError, match=r"'words' .* expects builtins\.str .* 'metrics-data-"):
        sources.MetricsDataSource().add_extractor(_TextExtractor())


def test_matching_types_wire_and_keep_order() -> None:
    source = sources.MetricsDataSource()
    first, second = extractors.CoreMetricsExtractor("a"), extractors.CoreMetricsExtractor("b")
    source.add_extractor(first)
    source.add_extractor(second)
    assert list(source.extractors) == [first, second]
    assert isinstance(source, interfaces.DataSource)
    assert isinstance(first, interfaces.Extractor)
