"""A model-server stand-in with metrics the test controls, on a 127.0.0.x address."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class BackendState:
    waiting: int = 0
    running: int = 0
    kv: float = 0.0
    running_loras: list[str] = field(default_factory=list)
    waiting_loras: list[str] = field(default_factory=list)
    max_lora: int = 0
    serve_metrics: bool = True
    custom_lines: list[str] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    # When set, a streamed answer sends its first event, then waits for the event.
    stream_gate: asyncio.Event | None = None

    def metrics_text(self) -> str:
        lines = [
            "# HELP vllm:num_requests_waiting Number of requests waiting.",
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}',
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="m"}} {self.running}',
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {self.kv}',
            "# TYPE vllm:cache_config_info gauge",
            'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000"} 1.0',
        ]
        if self.max_lora:
            lines.append(
                "vllm:lora_requests_info{"
                f'max_lora="{self.max_lora}",running_lora_adapters="{",".join(self.running_loras)}",'
                f'waiting_lora_adapters="{",".join(self.waiting_loras)}"}} 1.7e9'
            )
        lines.extend(self.custom_lines)
        return "\n".join(lines) + "\n"


@dataclass
class Backend:
    address: str
    port: int
    state: BackendState

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"


def _app(state: BackendState, name: str) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        if not state.serve_metrics:
            raise web.HTTPServiceUnavailable()
        return web.Response(text=state.metrics_text(), content_type="text/plain")

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.received.append(body)
        if b'"stream":true' in body.replace(b" ", b""):
            response = web.StreamResponse(
                headers={"content-type": "text/event-stream", "x-inference-pod": name}
            )
            await response.prepare(request)
            for i in range(5):
                await response.write(f'data: {{"choices":[{{"text":"t{i}"}}]}}\n\n'.encode())
                if i == 0 and state.stream_gate is not None:
                    await state.stream_gate.wait()
            usage = '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}'
            await response.write(f"data: {usage}\n\ndata: [DONE]\n\n".encode())
            await response.write_eof()
            return response
        return web.json_response(
            {
                "model": "m",
                "choices": [{"text": "ok"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            },
            headers={"x-inference-pod": name},
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


@contextlib.asynccontextmanager
async def backends(
    addresses: list[str], *, same_port: bool = False
) -> AsyncIterator[list[Backend]]:
    """One controllable backend per address (e.g. 127.0.0.2, 127.0.0.3), free ports.

    `same_port`: every backend listens on the port the first one got, as the pods of an
    InferencePool do on its target port.
    """
    runners: list[web.AppRunner] = []
    result: list[Backend] = []
    try:
        for address in addresses:
            state = BackendState()
            runner = web.AppRunner(_app(state, address), access_log=None)
            await runner.setup()
            port = result[0].port if same_port and result else 0
            site = web.TCPSite(runner, address, port)
            await site.start()
            runners.append(runner)
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            result.append(Backend(address, port, state))
        yield result
    finally:
        for runner in runners:
            await runner.cleanup()
