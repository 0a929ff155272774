"""Through a real Envoy: client -> Envoy -> ext_proc picker -> the backend it chose."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from tests.support.backends import Backend, backends
from tests.support.picker import fresh_metrics, running_picker, wait_for

pytestmark = pytest.mark.envoy

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@contextlib.asynccontextmanager
async def gateway(
    servers: list[Backend], *, tls: bool = False, **picker_options: object
) -> AsyncIterator[tuple[EnvoyProcess, object]]:
    endpoints = ",".join(s.target for s in servers)
    async with running_picker(endpoints=endpoints, secure_serving=tls, **picker_options) as picker:
        options = envoy_config.GatewayOptions(
            mode=envoy_config.GatewayMode.PICKER,
            picker_port=picker.grpc_port,
            picker_tls=tls,
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


async def test_answers_come_from_the_endpoint_the_picker_chose():
    async with backends(ADDRESSES) as servers:
        servers[0].state.waiting = 7
        servers[1].state.waiting = 0
        servers[2].state.waiting = 3
        async with gateway(servers) as (envoy, picker):
            status, headers, body = await post(envoy, orjson.dumps({"model": "m", "prompt": "hi"}))
            assert status == 200, body
            assert headers["x-inference-pod"] == servers[1].address
            assert orjson.loads(body)["usage"]["prompt_tokens"] == 3
            await wait_for(picker.in_flight.is_idle, what="release after response")


async def test_over_tls_with_a_self_signed_certificate():
    async with backends(ADDRESSES[:1]) as servers, gateway(servers, tls=True) as (envoy, _):
        status, headers, _ = await post(envoy, orjson.dumps({"model": "m", "prompt": "hi"}))
        assert status == 200
        assert headers["x-inference-pod"] == servers[0].address


async def test_streaming_sse_passes_through():
    async with backends(ADDRESSES[:2]) as servers, gateway(servers) as (envoy, picker):
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


async def test_bad_request_reaches_the_client_as_400():
    async with backends(ADDRESSES[:1]) as servers, gateway(servers) as (envoy, _):
        status, _, body = await post(envoy, b'{"model": "m", "prompt": ')
        assert status == 400
        assert body.startswith(b"inference error: BadRequest - request body is not valid JSON")
        status, _, body = await post(envoy, b'{"prompt": "x"}')
        assert status == 400
        assert b"'model' is required" in body


async def test_no_endpoints_reaches_the_client_as_503():
    async with gateway([]) as (envoy, _):
        status, _, body = await post(envoy, orjson.dumps({"model": "m", "prompt": "hi"}))
        assert status == 503
        assert body.startswith(b"inference error: ServiceUnavailable - ")


async def test_200_kb_prompt_arrives_byte_for_byte():
    async with backends(ADDRESSES[:2]) as servers, gateway(servers) as (envoy, _):
        prompt = "".join(chr(0x41 + (i * 7) % 26) for i in range(200_000))
        body = b'{"model" : "m",   "prompt": "' + prompt.encode() + b'", "max_tokens": 1}'
        status, headers, _ = await post(envoy, body)
        assert status == 200
        served = next(s for s in servers if s.address == headers["x-inference-pod"])
        assert served.state.received[-1] == body


async def test_model_rewrite_header_changes_only_the_model_upstream():
    async with backends(ADDRESSES[:1]) as servers, gateway(servers) as (envoy, _):
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
