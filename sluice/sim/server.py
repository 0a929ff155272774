"""One simulated vLLM server over HTTP (aiohttp): the OpenAI API, /health, /metrics.

Every response carries `x-inference-pod` and `x-inference-port` so tests and demos can
see who served a request; an incoming `x-request-id` is echoed back.

Failure injection (`faults`): an error rate, a slow start (503s), and silence (nothing
answered; `POST /sim/silence {"silent": true|false}` toggles it). The `/sim/...` control
endpoints always answer. `GET /sim/state` shows the engine and fault state as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from epp.bodies import tokenizer as tokenizing
from epp.bodies.parsers import ParsedBody
from sluice.sim import config as sim_config
from sluice.sim import engine, faults, kv_publisher, metrics_text, openai_api, realtime, tokens

log = logging.getLogger(__name__)

_MAX_BODY_BYTES = 64 * 1024 * 1024
_JSON = "application/json"


class SimulatedServer:
    """A vLLM look-alike on one port. Use `async with SimulatedServer(...)` or
    `await start()` / `await stop()`; `port` is the bound port (useful with port=0)."""

    def __init__(
        self,
        config: sim_config.SimConfig | None = None,
        *,
        pod_name: str = "sim-0",
        host: str = "127.0.0.1",
        port: int = 0,
        shutdown_timeout_s: float = 1.0,
        access_log: bool = False,
    ) -> None:
        self.config = config if config is not None else sim_config.SimConfig()
        if problems := self.config.problems():
            raise ValueError("; ".join(problems))
        self.pod_name = pod_name
        self.host = host
        self.port = port
        self.engine = realtime.EngineLoop(
            engine.EngineCore(self.config.performance), self.config.time_scale
        )
        self._adapters: dict[str, str] = {name: name for name in self.config.lora_modules}
        self._lora_enabled = bool(self._adapters)
        self.faults = faults.FaultInjector(
            pod_name=pod_name,
            failure_rate=self.config.failure_rate,
            slow_start_s=self.config.slow_start_s,
            silent_after_s=self.config.silent_after_s,
            seed=self.config.seed,
        )
        self._shutdown_timeout_s = shutdown_timeout_s
        self._access_log = access_log
        self._runner: web.AppRunner | None = None
        perf = self.config.performance
        self._cache_config = {
            "block_size": str(perf.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(perf.enable_prefix_caching),
            "gpu_memory_utilization": "0.9",
            "num_cpu_blocks": "0",
            "num_gpu_blocks": str(perf.kv_cache_blocks),
        }
        self.requests_received = 0
        self.tokenizer: tokenizing.ModelTokenizer | None = None
        if self.config.tokenizer:
            try:
                self.tokenizer = tokenizing.load(self.config.tokenizer)
            except tokenizing.TokenizerError as exc:
                raise ValueError(f"--tokenizer: {exc}") from None
        self._tokenized = tokenizing.TokenizerPool()
        self.kv_events: kv_publisher.KvEventPublisher | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    async def start(self) -> None:
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        app.on_response_prepare.append(self._stamp_headers)
        app.add_routes(
            [
                web.post("/v1/completions", self._completions),
                web.post("/v1/chat/completions", self._chat_completions),
                web.get("/v1/models", self._models),
                web.get("/health", self._health),
                web.get("/metrics", self._metrics),
                web.post("/v1/load_lora_adapter", self._load_lora),
                web.post("/v1/unload_lora_adapter", self._unload_lora),
                web.get("/sim/state", self._state),
                web.post("/sim/silence", self._silence),
                web.post("/reset_prefix_cache", self._reset_prefix_cache),
            ]
        )
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that goes away aborts its request
            shutdown_timeout=self._shutdown_timeout_s,
            access_log=log if self._access_log else None,
        )
        await runner.setup()
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        if self.config.kv_events is not None:
            self.kv_events = kv_publisher.KvEventPublisher(
                self.config.kv_events,
                topic=f"kv@{self.address}@{self.config.names[0]}",
                block_size=self.config.performance.block_size,
                lora_ids={name: i + 1 for i, name in enumerate(self.config.lora_modules)},
            )
            self.kv_events.attach(self.engine.core)
        self.engine.start()
        self.faults.start()

    async def stop(self) -> None:
        self.faults.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.engine.stop()
        if self.kv_events is not None:
            self.kv_events.close()
            self.kv_events = None

    async def __aenter__(self) -> SimulatedServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def silent(self) -> bool:
        return self.faults.silent

    def set_silent(self, silent: bool) -> None:
        self.faults.set_silent(silent)

    def metrics_text(self) -> bytes:
        core = self.engine.core
        gauges = metrics_text.Gauges(core.num_running, core.num_waiting, core.kv_cache_usage)
        return metrics_text.render(
            core.stats,
            gauges,
            model_name=self.config.names[0],
            cache_config=self._cache_config,
            lora=self.engine.lora_info() if self._lora_enabled else None,
        )

    # -- plumbing --------------------------------------------------------------------

    async def _stamp_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-inference-pod"] = self.pod_name
        response.headers["x-inference-port"] = str(self.port)
        if (request_id := request.headers.get("x-request-id")) is not None:
            response.headers["x-request-id"] = request_id

    async def _gate(self) -> web.Response | None:
        """Hold while silent; during slow start answer 503; else None (go ahead)."""
        await self.faults.hold()
        if self.faults.starting:
            return _error(503, "The model server is still starting (simulated slow start)")
        return None

    def _resolve(self, model: str) -> str | None:
        """The LoRA adapter a model name refers to (None = base model); 404 if unknown."""
        if model in self.config.names:
            return None
        if model in self._adapters:
            return model
        raise openai_api.ApiError(404, f"The model `{model}` does not exist.", "model")

    # -- inference -------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        if (held := await self._gate()) is not None:
            return held
        self.requests_received += 1
        body = await request.read()
        try:
            parsed = openai_api.parse(body, chat=chat)
            lora = self._resolve(parsed.model)
            prompt, max_tokens, limit_reason = self._plan(parsed, lora, body)
        except openai_api.ApiError as e:
            return web.Response(status=e.status, body=e.body(), content_type=_JSON)
        if self.faults.should_fail():
            return _error(self.config.failure_status, "Simulated failure (--failure-rate)")
        progress = asyncio.Event()
        sim_request = engine.SimRequest(
            ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            prompt,
            max_tokens,
            lora=lora,
            limit_reason=limit_reason,
            on_progress=progress.set,
        )
        try:
            self.engine.submit(sim_request)
        except ValueError as e:
            return _error(400, str(e))
        try:
            if parsed.stream:
                return await self._stream(request, parsed, sim_request, progress)
            while not sim_request.done:
                progress.clear()
                await progress.wait()
            await self.faults.hold()
            return web.Response(
                body=openai_api.response_body(
                    chat=chat,
                    request_id=sim_request.request_id,
                    created=int(time.time()),
                    model=parsed.model,
                    text=tokens.output_text(0, sim_request.generated),
                    finish_reason=sim_request.finish_reason,
                    usage_=_usage(sim_request),
                ),
                content_type=_JSON,
            )
        finally:
            if not sim_request.done:
                self.engine.abort(sim_request)

    def _plan(
        self, parsed: openai_api.ParsedRequest, lora: str | None, body: bytes = b""
    ) -> tuple[tokens.Prompt, int, str]:
        block_size = self.config.performance.block_size
        salt = parsed.cache_salt
        seed = tokens.hash_seed(lora or self.config.model, salt)
        ids = parsed.prompt_ids
        if ids is None and self.tokenizer is not None:
            # As vLLM: the model's tokenizer, through its chat template for chat.
            document = orjson.loads(body)
            api = "chat/completions" if parsed.chat else "completions"
            parsed_body = ParsedBody(api, parsed.model, "", document=document)
            found = self._tokenized.token_ids_now(self.tokenizer, parsed_body)
            ids = tuple(found) if found is not None else None
        if ids is not None:
            prompt = tokens.token_ids_prompt(ids, block_size, seed, salt)
        else:
            text = parsed.prompt_text or ""
            prompt = tokens.text_prompt(text, block_size, seed, salt)
            if self.kv_events is not None:
                prompt = dataclasses.replace(prompt, token_ids=tokens.pseudo_token_ids(text))
        if prompt.num_tokens == 0:
            raise openai_api.ApiError(400, "The decoder prompt cannot be empty", "prompt")
        context = self.config.context_tokens
        if parsed.max_tokens is None:
            max_tokens, limit_reason = self.config.default_max_tokens, "stop"
            max_tokens = min(max_tokens, context - prompt.num_tokens)
        else:
            max_tokens, limit_reason = parsed.max_tokens, "length"
        if max_tokens < 1 or prompt.num_tokens + max_tokens > context:
            raise openai_api.ApiError(
                400,
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt.num_tokens + max(max_tokens, 0)} tokens "
                f"({prompt.num_tokens} in the messages, {max(max_tokens, 0)} in the "
                "completion). Please reduce the length of the messages or completion.",
                "messages" if parsed.chat else "prompt",
            )
        return prompt, max_tokens, limit_reason

    async def _stream(
        self,
        request: web.Request,
        parsed: openai_api.ParsedRequest,
        sim_request: engine.SimRequest,
        progress: asyncio.Event,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)
        chunks = openai_api.StreamChunks(
            chat=parsed.chat,
            request_id=sim_request.request_id,
            created=int(time.time()),
            model=parsed.model,
        )
        sent = 0
        with contextlib.suppress(ConnectionResetError):
            while True:
                progress.clear()
                generated, done = sim_request.generated, sim_request.done
                out: list[bytes] = []
                if parsed.chat and sent == 0 and generated > 0:
                    out.append(chunks.role())
                for i in range(sent, generated):
                    last = done and i == generated - 1
                    out.append(
                        chunks.token(
                            tokens.output_text(i, 1), sim_request.finish_reason if last else None
                        )
                    )
                sent = generated
                if done:
                    if parsed.include_usage:
                        out.append(chunks.usage(_usage(sim_request)))
                    out.append(chunks.done())
                if out:
                    await self.faults.hold()
                    await response.write(b"".join(out))
                if done:
                    break
                await progress.wait()
            await response.write_eof()
        return response

    # -- everything else -------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        if (held := await self._gate()) is not None:
            return held
        created = int(time.time())
        base = self.config.names[0]
        data: list[dict[str, Any]] = [
            openai_api.model_card(
                name,
                created,
                root=self.config.model,
                parent=None,
                max_model_len=self.config.context_tokens,
            )
            for name in self.config.names
        ]
        data += [
            openai_api.model_card(name, created, root=path, parent=base, max_model_len=None)
            for name, path in self._adapters.items()
        ]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's POST /reset_prefix_cache: drops every cached block (AllBlocksCleared)."""
        if not self.engine.core.pool.reset():
            return _error(400, "cannot reset the prefix cache while requests hold blocks")
        if self.kv_events is not None:
            self.kv_events.cleared()
        return web.Response(status=200)

    async def _health(self, request: web.Request) -> web.Response:
        if (held := await self._gate()) is not None:
            return held
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        if (held := await self._gate()) is not None:
            return held
        return web.Response(
            body=self.metrics_text(), headers={"Content-Type": metrics_text.CONTENT_TYPE}
        )

    async def _load_lora(self, request: web.Request) -> web.Response:
        if (held := await self._gate()) is not None:
            return held
        body = await _json_object(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str):
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name in self._adapters or name in self.config.names:
            return _error(400, f"The lora adapter '{name}' has already been loaded.")
        self._adapters[name] = path
        self._lora_enabled = True
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        if (held := await self._gate()) is not None:
            return held
        body = await _json_object(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in self._adapters:
            return _error(404, f"The lora adapter '{name}' cannot be found.")
        del self._adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self._state_dict(), dumps=_dumps)

    async def _silence(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        silent = body.get("silent")
        if not isinstance(silent, bool):
            return _error(400, 'Send {"silent": true} or {"silent": false}.')
        self.set_silent(silent)
        return web.json_response(self._state_dict(), dumps=_dumps)

    def _state_dict(self) -> dict[str, Any]:
        core = self.engine.core
        return {
            "pod": self.pod_name,
            "silent": self.silent,
            "starting": self.faults.starting,
            "running": core.num_running,
            "waiting": core.num_waiting,
            "kv_cache_usage": core.kv_cache_usage,
            "loaded_loras": core.loaded_loras,
            "lag_s": self.engine.lag_s,
            "requests_received": self.requests_received,
            "failures_injected": self.faults.failures_injected,
        }


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _usage(r: engine.SimRequest) -> dict[str, Any]:
    return openai_api.usage(r.prompt.num_tokens, r.generated, r.cached_tokens or 0)


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=openai_api.error_body(status, message), content_type=_JSON
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        value = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
