"""A model server that takes requests and never answers them, while its /metrics still
looks healthy: after Envoy gives up on one of its requests, the picker stops routing there."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from tests.support.backends import backends
from tests.support.picker import fresh_metrics, running_picker

pytestmark = pytest.mark.envoy

METRICS = """vllm:num_requests_waiting{model_name="m"} 0
vllm:num_requests_running{model_name="m"} 0
vllm:kv_cache_usage_perc{model_name="m"} 0.0
"""


@contextlib.asynccontextmanager
async def hung_server(address: str) -> AsyncIterator[str]:
    never = asyncio.Event()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS, content_type="text/plain")

    async def completions(request: web.Request) -> web.Response:
        await request.read()
        await never.wait()  # the engine hangs
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, address, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{address}:{port}"
    finally:
        never.set()
        await runner.cleanup()


async def test_an_endpoint_left_hanging_is_held_out_of_routing():
    body = orjson.dumps({"model": "m", "prompt": "hello"})
    async with backends(["127.0.0.2"]) as live, hung_server("127.0.0.3") as hung:
        live[0].state.waiting = 3  # the hung server looks like the better choice
        async with running_picker(
            endpoints=f"{live[0].target},{hung}", response_header_timeout_s=0.5
        ) as picker:
            options = envoy_config.GatewayOptions(
                mode=envoy_config.GatewayMode.PICKER,
                picker_port=picker.grpc_port,
                request_body_mode=envoy_config.BodyMode.BUFFERED,
                response_body_mode=envoy_config.BodyMode.STREAMED,
                stream_idle_timeout_s=1.0,
            )
            async with EnvoyProcess(options) as envoy, aiohttp.ClientSession() as session:
                await fresh_metrics(picker)
                url = envoy.url + "/v1/completions"
                headers = {"content-type": "application/json"}
                async with session.post(url, data=body, headers=headers) as first:
                    assert first.status == 504  # Envoy's idle timeout on the hung server
                statuses = []
                for _ in range(5):
                    async with session.post(url, data=body, headers=headers) as response:
                        statuses.append(response.status)
                        assert response.headers.get("x-inference-pod") == "127.0.0.2"
                assert statuses == [200] * 5
                hung_key = next(
                    e.key for e in picker.reconciler.current.endpoints if e.address == "127.0.0.3"
                )
                assert picker.metrics_store.held_out(hung_key, time.monotonic())
