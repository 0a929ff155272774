"""The scrape client's HTTP/1.1 framing and connection handling against a raw server."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from epp.datalayer import http_client, interfaces, sources
from epp.datastore.snapshot import Endpoint, EndpointKey
from epp.extproc import server as server_tls
from tests.datalayer.raw_http import Answer, RawServer, chunked, content_length

BODY = b"vllm:num_requests_waiting 3\n" * 40


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(answer: Answer, **options: Any) -> RawServer:
        server = RawServer(answer, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


async def _get(client: http_client.KeepAliveClient, server: RawServer) -> http_client.HttpResponse:
    return await client.get("127.0.0.1", server.port, "/metrics")


@pytest.mark.parametrize("split", [0, 1, 5])
async def test_content_length_body_reuses_one_connection(serve, split: int) -> None:
    server = await serve(answer=lambda n: content_length(BODY), split_bytes=split)
    client = http_client.KeepAliveClient(extra_headers=(("Accept", "text/plain"),))
    for _ in range(5):
        response = await _get(client, server)
        assert (response.status, response.body) == (200, BODY)
    assert server.connections == 1 and server.requests == 5
    head = server.request_heads[0]
    assert head.startswith(b"GET /metrics HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in head
    assert b"Accept: text/plain\r\n" in head
    client.close()


@pytest.mark.parametrize("split", [0, 1, 3])
async def test_chunked_body_with_extensions_and_trailers(serve, split: int) -> None:
    server = await serve(
        answer=lambda n: chunked(BODY, trailer="X-Trailer: 1\r\n"), split_bytes=split
    )
    client = http_client.KeepAliveClient()
    for _ in range(3):
        assert (await _get(client, server)).body == BODY
    assert server.connections == 1
    client.close()


async def test_body_delimited_by_close_and_connection_close(serve) -> None:
    until_close = await serve(
        answer=lambda n: b"HTTP/1.0 200 OK\r\n\r\n" + BODY, close_after_answer=True
    )
    told_to_close = await serve(
        answer=lambda n: content_length(BODY, extra="Connection: close\r\n"),
        close_after_answer=True,
    )
    client = http_client.KeepAliveClient()
    for server in (until_close, told_to_close):
        for _ in range(3):
            assert (await _get(client, server)).body == BODY
        assert server.connections == 3  # a new connection each time, as the server asked
    assert client.idle_connections == 0


async def test_non_200_status_and_empty_204(serve) -> None:
    server = await serve(
        answer=lambda n: content_length(b"busy", 503) if n == 1 else b"HTTP/1.1 204 No\r\n\r\n"
    )
    client = http_client.KeepAliveClient()
    assert (await _get(client, server)).status == 503
    response = await _get(client, server)
    assert (response.status, response.body) == (204, b"")
    assert server.connections == 1


async def test_reconnects_when_the_server_dropped_the_idle_connection(serve) -> None:
    server = await serve(answer=lambda n: content_length(BODY))
    client = http_client.KeepAliveClient()
    await _get(client, server)
    server.drop_connections()
    await asyncio.sleep(0.01)  # let the close reach the client (or not: both paths work)
    assert (await _get(client, server)).body == BODY
    assert server.connections == 2


async def test_restarted_server_is_reached_again(serve) -> None:
    server = await serve(answer=lambda n: content_length(BODY))
    client = http_client.KeepAliveClient()
    await _get(client, server)
    await server.stop()
    with pytest.raises(http_client.HttpError):
        await _get(client, server)
    await server.start()  # same port
    assert (await _get(client, server)).body == BODY


async def test_cancelled_request_closes_its_connection(serve) -> None:
    server = await serve(answer=lambda n: content_length(BODY), hang=True)
    client = http_client.KeepAliveClient()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await _get(client, server)
    assert client.idle_connections == 0
    server.hang = False
    assert (await _get(client, server)).body == BODY
    assert server.connections == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SPDY/3 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n", "CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n", "5000 bytes exceeds the 1000"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed before a full answer"),
    ],
)
async def test_malformed_answers_are_errors_and_drop_the_connection(
    serve, raw: bytes, message: str
) -> None:
    server = await serve(answer=lambda n: raw, close_after_answer=b"short" in raw)
    client = http_client.KeepAliveClient(max_body_bytes=1000)
    with pytest.raises(http_client.HttpError, match=message):
        await _get(client, server)
    assert client.idle_connections == 0


async def test_oversized_chunked_and_close_delimited_bodies(serve) -> None:
    big = b"x" * 3000
    for answer in (chunked(big, size=500), b"HTTP/1.1 200 OK\r\n\r\n" + big):
        server = await serve(answer=lambda n, a=answer: a, close_after_answer=True)
        client = http_client.KeepAliveClient(max_body_bytes=1000)
        with pytest.raises(http_client.HttpError, match="1000-byte limit"):
            await _get(client, server)


async def test_refused_connection() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = http_client.KeepAliveClient()
    with pytest.raises(http_client.HttpError, match="cannot connect"):
        await client.get("127.0.0.1", port, "/metrics")


async def test_forget_and_close(serve) -> None:
    server = await serve(answer=lambda n: content_length(BODY))
    client = http_client.KeepAliveClient()
    await _get(client, server)
    client.forget("127.0.0.1", server.port)
    assert client.idle_connections == 0
    await _get(client, server)
    assert server.connections == 2
    client.close()
    with pytest.raises(http_client.HttpError, match="closed"):
        await _get(client, server)


async def test_https_with_insecure_skip_verify(tmp_path: Path) -> None:
    """TLS through the buffered protocol, against a self-signed server."""
    files = server_tls.load_or_create_tls(None)
    (tmp_path / "tls.crt").write_bytes(files.certificate)
    (tmp_path / "tls.key").write_bytes(files.private_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(chunked(BODY))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        source = sources.MetricsDataSource(scheme="https", insecure_skip_verify=True)
        endpoint = Endpoint(EndpointKey("ns/tls-rank-0"), "tls", "ns", "127.0.0.1", port)
        for _ in range(3):
            page = await source.fetch(endpoint)
            assert page.text == BODY.decode()
        verifying = sources.MetricsDataSource(scheme="https")
        with pytest.raises(interfaces.FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            await verifying.fetch(endpoint)
        source.close()
        verifying.close()
    finally:
        server.close()
        await server.wait_closed()
