"""Through a real Envoy: client -> Envoy -> ext_proc picker -> the backend it chose.

Every test runs with the body modes Sluice ships (buffered request, streamed response the
picker may skip) and with full duplex both ways (gateways configured by others)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from epp import metrics
from epp.picker import Picker
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from tests.support.backends import Backend, backends
from tests.support.picker import fresh_metrics, running_picker, wait_for

pytestmark = pytest.mark.envoy

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
SHIPPED = (envoy_config.BodyMode.BUFFERED, envoy_config.BodyMode.STREAMED)
FULL_DUPLEX = (envoy_config.BodyMode.FULL_DUPLEX_STREAMED,) * 2


@pytest.fixture(params=[SHIPPED, FULL_DUPLEX], ids=["shipped", "full-duplex"])
def modes(request: pytest.FixtureRequest) -> tuple[envoy_config.BodyMode, envoy_config.BodyMode]:
    return request.param  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def gateway(
    servers: list[Backend],
    modes: tuple[envoy_config.BodyMode, envoy_config.BodyMode],
    *,
    tls: bool = False,
    **picker_options: object,
) -> AsyncIterator[tuple[EnvoyProcess, Picker]]:
    endpoints = ",".join(s.target for s in servers)
    async with running_picker(endpoints=endpoints, secure_serving=tls, **picker_options) as picker:
        options = envoy_config.GatewayOptions(
            mode=envoy_config.GatewayMode.PICKER,
            picker_port=picker.grpc_port,
            picker_tls=tls,
            request_body_mode=modes[0],
            response_body_mode=modes[1],
        )
        async with EnvoyProcess(options) as envoy:
            if servers:
                await fresh_metrics(picker)
            yield envoy, picker


async def post(
    envoy: EnvoyProcess, body: bytes, path: str = "/v1/completions"
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            envoy.url + path, data=body, headers={"content-type": "application/json"}
        ) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def test_answers_come_from_the_endpoint_the_picker_chose(modes):
    async with backends(ADDRESSES) as servers:
        servers[0].state.waiting = 7
        servers[1].state.waiting = 0
        servers[2].state.waiting = 3
        async with gateway(servers, modes) as (envoy, picker):
            status, headers, body = await post(envoy, orjson.dumps({"model": "m", "prompt": "hi"}))
            assert status == 200, body
            assert headers["x-inference-pod"] == servers[1].address
            assert orjson.loads(body)["usage"]["prompt_tokens"] == 3
            await wait_for(picker.in_flight.is_idle, what="release after response")


async def test_over_tls_with_a_self_signed_certificate(modes):
    async with backends(ADDRESSES[:1]) as servers, gateway(servers, modes, tls=True) as (envoy, _):
        status, headers, _ = await post(envoy, orjson.dumps({"model": "m", "prompt": "hi"}))
        assert status == 200
        assert headers["x-inference-pod"] == servers[0].address


async def test_streaming_sse_passes_through(modes):
    async with backends(ADDRESSES[:2]) as servers, gateway(servers, modes) as (envoy, picker):
        body = orjson.dumps({"model": "m", "prompt": "hi", "stream": True})
        async with (
            aiohttp.ClientSession() as session,
            session.post(envoy.url + "/v1/completions", data=body) as response,
        ):
            assert response.status == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line async for line in response.content if line.startswith(b"data:")]
        assert len(events) == 7
        assert events[-1].strip() == b"data: [DONE]"
        await wait_for(picker.in_flight.is_idle, what="release after stream")


async def test_bad_request_reaches_the_client_as_400(modes):
    async with backends(ADDRESSES[:1]) as servers, gateway(servers, modes) as (envoy, _):
        status, _, body = await post(envoy, b'{"model": "m", "prompt": ')
        assert status == 400
        assert body.startswith(b"inference error: BadRequest - request body is not valid JSON")
        status, _, body = await post(envoy, b'{"prompt": "x"}')
        assert status == 400
        assert b"'model' is required" in body


async def test_no_endpoints_reaches_the_client_as_503(modes):
    async with gateway([], modes) as (envoy, _):
        status, _, body = await post(envoy, orjson.dumps({"model": "m", "prompt": "hi"}))
        assert status == 503
        assert body.startswith(b"inference error: ServiceUnavailable - ")


async def test_200_kb_prompt_arrives_byte_for_byte(modes):
    async with backends(ADDRESSES[:2]) as servers, gateway(servers, modes) as (envoy, _):
        prompt = "".join(chr(0x41 + (i * 7) % 26) for i in range(200_000))
        body = b'{"model" : "m",   "prompt": "' + prompt.encode() + b'", "max_tokens": 1}'
        status, headers, _ = await post(envoy, body)
        assert status == 200
        served = next(s for s in servers if s.address == headers["x-inference-pod"])
        assert served.state.received[-1] == body


async def test_model_rewrite_header_changes_only_the_model_upstream(modes):
    async with backends(ADDRESSES[:1]) as servers, gateway(servers, modes) as (envoy, _):
        body = b'{"model": "m",  "prompt": "hi"}'
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                envoy.url + "/v1/completions",
                data=body,
                headers={"x-gateway-model-name-rewrite": "m-v2"},
            ) as response,
        ):
            assert response.status == 200
            # The backend answered with model "m"; nothing to restore, passed unchanged.
            assert (await response.json())["model"] == "m"
        assert servers[0].state.received[-1] == b'{"model": "m-v2",  "prompt": "hi"}'


def _count(name: str) -> float:
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
        if sample.name == name
    )


@pytest.mark.parametrize("sample_rate", [0.0, 1.0])
async def test_a_streamed_response_holds_its_slot_until_it_really_ends(modes, sample_rate):
    """Whether the picker reads the response body (sampled) or lets Envoy skip it (shipped
    modes, not sampled), the request's slot is held while the response streams and given
    back when it ends; only a read response adds latency samples."""
    async with backends(ADDRESSES[:1]) as servers:
        gate = servers[0].state.stream_gate = asyncio.Event()
        async with gateway(servers, modes, response_sample_rate=sample_rate) as (envoy, picker):
            ttft_before = _count("inference_objective_request_ttft_seconds_count")
            done_before = _count("inference_objective_request_duration_seconds_count")
            body = orjson.dumps({"model": "m", "prompt": "hi", "stream": True})
            async with (
                aiohttp.ClientSession() as session,
                session.post(envoy.url + "/v1/completions", data=body) as response,
            ):
                assert (await response.content.readline()).startswith(b"data:")
                assert picker.in_flight.in_flight == 1  # streaming: the slot is held
                gate.set()
                events = [line async for line in response.content if line.startswith(b"data:")]
            assert events[-1].strip() == b"data: [DONE]"
            await wait_for(picker.in_flight.is_idle, what="release when the stream ends")
            assert _count("inference_objective_request_duration_seconds_count") == done_before + 1
            observed = _count("inference_objective_request_ttft_seconds_count") - ttft_before
            # Full duplex always sees the chunks (Envoy ignores mode_override there).
            assert observed == (1 if sample_rate or modes == FULL_DUPLEX else 0)


async def test_a_rewritten_model_is_restored_in_the_response_whatever_the_sampling(modes):
    async with (
        backends(ADDRESSES[:1]) as servers,
        gateway(servers, modes, response_sample_rate=0.0) as (envoy, _),
        aiohttp.ClientSession() as session,
    ):
        body = b'{"model": "alias",  "prompt": "hi"}'
        headers = {"x-gateway-model-name-rewrite": "m"}
        async with session.post(envoy.url + "/v1/completions", data=body, headers=headers) as r:
            assert r.status == 200
            # The backend answered "m"; the client sees the name it sent.
            assert (await r.json())["model"] == "alias"
        assert servers[0].state.received[-1] == b'{"model": "m",  "prompt": "hi"}'


async def test_a_body_over_the_picker_limit_is_a_clear_413(modes):
    async with (
        backends(ADDRESSES[:1]) as servers,
        gateway(servers, modes, max_request_body_bytes=100_000) as (envoy, _),
    ):
        body = b'{"model": "m", "prompt": "' + b"x" * 200_000 + b'"}'
        status, _, answer = await post(envoy, body)
    assert status == 413
    assert answer.startswith(b"inference error: RequestTooLarge - ")
    assert servers[0].state.received == []
