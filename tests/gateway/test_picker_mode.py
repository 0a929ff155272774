"""Picker mode through a real Envoy, with the stub ext_proc server standing in for the picker.

These tests pin the Envoy 1.40 behaviour the picker relies on: which messages arrive in
which order and what Envoy does with the answers. FailOpen / FailClose are in
`test_failure_modes`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from sluice.gateway import envoy_config, envoy_process, settings
from sluice.gateway.settings import BodyMode, FailureMode, GatewayOptions
from tests.gateway import ext_proc_stub as stub
from tests.gateway import tls
from tests.gateway.conftest import SSE_EVENTS, Backend
from tests.gateway.harness import gateway, post, read_sse_releasing_each
from tests.support.picker import wait_for

pytestmark = pytest.mark.envoy

HEADER = settings.DESTINATION_HEADER
# `stub.shape` patterns: a run of chunks may be absent when one chunk carries end_of_stream.
FULL_DUPLEX_POST = (
    r"request_headers (request_body\* )?request_body! "
    r"response_headers (response_body\* )?response_body!"
)


async def test_full_duplex_routes_after_the_body_and_sequence_is_pinned(
    backends: tuple[Backend, Backend],
) -> None:
    target = backends[1]
    body = b'{"model": "llama", "prompt": "hello"}'
    async with gateway(stub.StubBehaviour(destination=target.address)) as (envoy, picker):
        status, text = await post(envoy.url + "/v1/completions", body)
    assert status == 200 and '"pod": "beta"' in text
    assert target.bodies == [body]
    [stream] = picker.streams
    assert re.fullmatch(FULL_DUPLEX_POST, stub.shape(stream)), stub.shape(stream)
    assert sum(s.size for s in stream if s.kind == "request_body") == len(body)
    # No trailers message when the request has none, although trailer mode is SEND.
    assert not any(s.kind.endswith("trailers") for s in stream)
    assert picker.closed_streams == 1


async def test_header_only_request_is_answered_at_the_headers(
    backends: tuple[Backend, Backend],
) -> None:
    target = backends[0]
    async with (
        gateway(stub.StubBehaviour(destination=target.address)) as (envoy, picker),
        aiohttp.ClientSession() as session,
        session.get(envoy.url + "/v1/models") as response,
    ):
        assert (await response.json())["pod"] == "alpha"
    [stream] = picker.streams
    assert re.fullmatch(
        r"request_headers! response_headers (response_body\* )?response_body!", stub.shape(stream)
    )


async def test_answering_headers_before_the_body_also_works(
    backends: tuple[Backend, Backend],
) -> None:
    target = backends[0]
    body = os.urandom(300 * 1024)
    behaviour = stub.StubBehaviour(destination=target.address, answer_headers_first=True)
    async with gateway(behaviour) as (envoy, _picker):
        status, _ = await post(envoy.url + "/v1/completions", body)
    assert status == 200 and target.bodies == [body]


async def test_route_is_recomputed_even_without_clear_route_cache(
    backends: tuple[Backend, Backend],
) -> None:
    """The header route is chosen after the picker's answer (route_cache_action CLEAR), so a
    picker that omits clear_route_cache is not sent down the no-header fallback route."""
    chosen, fallback = backends
    behaviour = stub.StubBehaviour(destination=chosen.address, clear_route_cache=False)
    async with gateway(behaviour, backends=(fallback.address,)) as (envoy, _picker):
        status, text = await post(envoy.url + "/", b"{}")
    assert status == 200 and '"pod": "alpha"' in text
    assert fallback.bodies == []


@pytest.mark.parametrize("size_bytes", [200 * 1024, 1024 * 1024])
async def test_large_body_arrives_byte_for_byte_without_content_length(
    backends: tuple[Backend, Backend], size_bytes: int
) -> None:
    target = backends[0]
    body = os.urandom(size_bytes)
    async with gateway(stub.StubBehaviour(destination=target.address)) as (envoy, _picker):
        status, text = await post(envoy.url + "/v1/completions", body)
    assert status == 200 and hashlib.sha256(body).hexdigest() in text
    assert target.bodies == [body]
    # FULL_DUPLEX_STREAMED: Envoy drops Content-Length (even the one the picker set) and
    # sends the body chunked.
    headers = {k.lower(): v for k, v in target.headers[0].items()}
    assert "content-length" not in headers
    assert headers["transfer-encoding"] == "chunked"


async def test_streamed_response_passes_through_the_picker_incrementally(
    backends: tuple[Backend, Backend],
) -> None:
    target = backends[1]
    async with gateway(stub.StubBehaviour(destination=target.address)) as (envoy, picker):
        async with aiohttp.ClientSession() as session:
            events = await read_sse_releasing_each(session, envoy.url, target, {})
        await picker.wait_closed(1)
    assert events == [f"data: beta {i}" for i in range(SSE_EVENTS)]
    [stream] = picker.streams
    assert re.fullmatch(FULL_DUPLEX_POST, stub.shape(stream))
    response_chunks = [s for s in stream if s.kind == "response_body" and s.size]
    assert len(response_chunks) == SSE_EVENTS  # one message per event written


async def test_stream_ends_with_the_response_unless_response_body_is_skipped(
    backends: tuple[Backend, Backend],
) -> None:
    """With response body mode NONE Envoy closes the gRPC stream right after the response
    headers answer: the picker cannot see when a streamed response ends."""
    target = backends[1]
    for body_mode in (BodyMode.FULL_DUPLEX_STREAMED, BodyMode.NONE):
        behaviour = stub.StubBehaviour(destination=target.address)
        async with (
            gateway(behaviour, response_body_mode=body_mode) as (envoy, picker),
            aiohttp.ClientSession() as session,
            session.post(envoy.url + "/sse", data=b"{}") as response,
        ):
            assert (await response.content.readline()).startswith(b"data: beta 0")
            if body_mode is BodyMode.NONE:
                await picker.wait_closed(1)  # while the backend still holds the stream open
            for _ in range(SSE_EVENTS - 1):
                target.sse_release.put_nowait(None)
            await response.read()
            await picker.wait_closed(1)
        closed_after_end = picker.closed_at[0] >= target.sse_ended_at[-1]
        assert closed_after_end is (body_mode is BodyMode.FULL_DUPLEX_STREAMED), body_mode
        assert picker.closed_streams == 1


async def test_client_destination_header_never_reaches_the_picker(
    backends: tuple[Backend, Backend],
) -> None:
    chosen, requested = backends
    async with gateway(stub.StubBehaviour(destination=chosen.address)) as (envoy, picker):
        status, text = await post(envoy.url + "/", b"{}", headers={HEADER: requested.address})
    assert status == 200 and '"pod": "alpha"' in text
    assert HEADER not in picker.request_headers[0]
    assert requested.bodies == []


async def test_subset_hint_and_lb_metadata(
    backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    target = backends[0]
    log = tmp_path / "access.log"
    behaviour = stub.StubBehaviour(destination=target.address)
    hint = (backends[1].address,)
    async with gateway(behaviour, subset_hint=hint, access_log_path=str(log)) as (envoy, picker):
        await post(envoy.url + "/", b"{}")
        # Envoy flushes the access log on its own schedule: wait for the line.
        await wait_for(lambda: log.exists() and "lb=" in log.read_text(), what="access log")
    subset = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": list(hint)}}
    assert picker.metadata_contexts[0] == subset
    # The picker's dynamic metadata in envoy.lb was accepted (receiving_namespaces).
    assert f"lb={target.address}" in log.read_text()


async def test_immediate_response_after_the_body(backends: tuple[Backend, Backend]) -> None:
    behaviour = stub.StubBehaviour(destination=backends[0].address, immediate_status=429)
    async with gateway(behaviour) as (envoy, _picker):
        status, text = await post(envoy.url + "/v1/completions", b'{"model": "m"}')
    assert (status, text) == (429, "inference error: stub - status 429")
    assert backends[0].bodies == []


async def test_mode_override_is_ignored_when_a_direction_is_full_duplex(
    backends: tuple[Backend, Backend],
) -> None:
    behaviour = stub.StubBehaviour(destination=backends[0].address, skip_response_body=True)
    async with gateway(behaviour) as (envoy, picker):
        await post(envoy.url + "/", b"{}")
    assert re.fullmatch(FULL_DUPLEX_POST, stub.shape(picker.streams[0]))


async def test_mode_override_skips_the_response_body_in_buffered_mode(
    backends: tuple[Backend, Backend],
) -> None:
    """Without full duplex, mode_override on the response-headers answer turns off response
    body processing, yet the gRPC stream stays open until the HTTP response ends: the picker
    still sees the request finish, for three messages in all."""
    target = backends[0]
    behaviour = stub.StubBehaviour(
        destination=target.address,
        full_duplex_request=False,
        full_duplex_response=False,
        skip_response_body=True,
    )
    options = {"request_body_mode": BodyMode.BUFFERED, "response_body_mode": BodyMode.STREAMED}
    async with (
        gateway(behaviour, **options) as (envoy, picker),
        aiohttp.ClientSession() as session,
    ):
        async with session.post(envoy.url + "/sse", data=b"{}") as response:
            assert (await response.content.readline()).startswith(b"data: alpha 0")
            for _ in range(SSE_EVENTS - 1):
                target.sse_release.put_nowait(None)
            assert (await response.read()).endswith(b"data: alpha 2\n\n")
        await picker.wait_closed(1)
    # The stream ended only after the backend had ended the response.
    assert picker.closed_streams == 1
    assert picker.closed_at[0] >= target.sse_ended_at[-1]
    assert stub.shape(picker.streams[0]) == "request_headers request_body! response_headers"


async def test_buffered_mode_sends_each_body_in_one_message(
    backends: tuple[Backend, Backend],
) -> None:
    target = backends[0]
    body = os.urandom(1024 * 1024)
    behaviour = stub.StubBehaviour(
        destination=target.address, full_duplex_request=False, full_duplex_response=False
    )
    options = {"request_body_mode": BodyMode.BUFFERED, "response_body_mode": BodyMode.BUFFERED}
    async with gateway(behaviour, **options) as (envoy, picker):
        status, _ = await post(envoy.url + "/", body)
    assert status == 200 and target.bodies == [body]
    [stream] = picker.streams
    assert stub.shape(stream) == "request_headers request_body! response_headers response_body!"
    assert stream[1].size == len(body)
    # Unlike full duplex, buffered mode keeps the client's Content-Length.
    assert {k.lower(): v for k, v in target.headers[0].items()}["content-length"] == str(len(body))


async def test_request_trailers_end_the_body_instead_of_end_of_stream(
    backends: tuple[Backend, Backend],
) -> None:
    body, picker = await _post_with_trailers(backends[0], retry_policy=False)
    assert body == b"hello world"
    assert stub.shape(picker.streams[0]).startswith(
        "request_headers request_body* request_trailers response_headers"
    )


async def test_full_duplex_with_a_retry_policy_sends_a_body_with_trailers_twice(
    backends: tuple[Backend, Backend],
) -> None:
    """Why the renderer puts no retry policy on full-duplex picker routes: in this Envoy the
    router's retry buffering and ext_proc's streamed body both reach the upstream."""
    body, _ = await _post_with_trailers(backends[0], retry_policy=True)
    assert body == b"hello world" * 2


async def _post_with_trailers(
    target: Backend, *, retry_policy: bool
) -> tuple[bytes, stub.StubPicker]:
    server, port, picker = await stub.serve(stub.StubBehaviour(destination=target.address))
    duplex = BodyMode.FULL_DUPLEX_STREAMED
    options = GatewayOptions(picker_port=port, request_body_mode=duplex, response_body_mode=duplex)
    bootstrap = envoy_config.render_bootstrap(options)
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_protocol_options"] = {
        "enable_trailers": True
    }  # HTTP/1.1 trailers are dropped by default
    [route, _] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert "retry_policy" not in route["route"]
    if retry_policy:
        route["route"]["retry_policy"] = {"retry_on": "connect-failure", "num_retries": 1}
    try:
        async with envoy_process.EnvoyProcess(bootstrap) as envoy:
            reader, writer = await asyncio.open_connection(envoy.host, envoy.port)
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: sluice\r\nTransfer-Encoding: chunked\r\n"
                b"Trailer: x-check\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-check: 1\r\n\r\n"
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            writer.close()
    finally:
        await stub.stop(server)
    assert head.startswith(b"HTTP/1.1 200")
    [body] = target.bodies
    return body, picker


# -- TLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [False, True])
async def test_tls_to_the_picker(
    backends: tuple[Backend, Backend], tmp_path: Path, verify: bool
) -> None:
    cert, key = tls.self_signed(tmp_path)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    behaviour = stub.StubBehaviour(destination=backends[0].address)
    options: dict[str, Any] = {"picker_tls": True, "failure_mode": FailureMode.FAIL_CLOSE}
    if verify:
        options |= {"picker_ca_file": str(cert), "picker_sni": "localhost"}
    async with gateway(behaviour, credentials, **options) as (envoy, picker):
        status, text = await post(envoy.url + "/", b"{}")
    assert status == 200 and '"pod": "alpha"' in text
    assert picker.closed_streams == 1
