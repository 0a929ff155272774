"""Real vLLM through a real Envoy and the picker: metrics, completions, chat, usage, rewrites.

The servers are the package's two (conftest): tiny random model, so answers are noise of
exactly `max_tokens` tokens (`ignore_eos`), and the checks are about what the picker
reads and passes on, never about the text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from epp import metrics
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.picker import Picker
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from tests.support import vllm
from tests.support.picker import fresh_metrics, running_picker, wait_for
from tests.vllm.conftest import VllmPool

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="package")]

PROMPT = "route the request to the endpoint whose prefix cache holds the longest match"
MESSAGES = [
    {"role": "system", "content": "You pick endpoints."},
    {"role": "user", "content": PROMPT},
]


@contextlib.asynccontextmanager
async def gateway(**picker_options: object) -> AsyncIterator[tuple[EnvoyProcess, Picker]]:
    async with running_picker(**picker_options) as picker:
        options = envoy_config.GatewayOptions(
            mode=envoy_config.GatewayMode.PICKER, picker_port=picker.grpc_port
        )
        async with EnvoyProcess(options) as envoy:
            await fresh_metrics(picker)
            yield envoy, picker


def endpoints(pool: VllmPool) -> str:
    return ",".join(server.target for server in pool.servers)


def metrics_of(picker: Picker, server: vllm.VllmServer) -> EndpointMetrics:
    for endpoint in picker.reconciler.current.endpoints:
        if endpoint.target == server.target:
            return picker.metrics_store.get(endpoint.key)
    raise AssertionError(f"{server.target} is not in the picker's pool")


async def post(
    envoy: EnvoyProcess, path: str, body: dict[str, Any], **headers: str
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(envoy.url + path, data=orjson.dumps(body), headers=_json(headers)) as response,
    ):
        return response.status, orjson.loads(await response.read())


async def post_streamed(
    envoy: EnvoyProcess, path: str, body: dict[str, Any], **headers: str
) -> list[dict[str, Any]]:
    """The `data:` events of a streamed answer, decoded, up to `[DONE]`."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(envoy.url + path, data=orjson.dumps(body), headers=_json(headers)) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line.strip() async for line in response.content if line.startswith(b"data:")]
    assert lines[-1] == b"data: [DONE]"
    return [orjson.loads(line[len(b"data:") :]) for line in lines[:-1]]


def _json(headers: dict[str, str]) -> dict[str, str]:
    return {"content-type": "application/json", **headers}  # vLLM answers 400 without it


def completion(max_tokens: int, **fields: Any) -> dict[str, Any]:
    return {"model": vllm.MODEL_NAME, "max_tokens": max_tokens, "ignore_eos": True, **fields}


def _sample_total(name: str) -> float:
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
        if sample.name == name
    )


def token_totals() -> tuple[float, float, float]:
    """Requests with usage, prompt tokens and completion tokens the picker has counted."""
    return (
        _sample_total("inference_objective_input_tokens_count"),
        _sample_total("inference_objective_input_tokens_sum"),
        _sample_total("inference_objective_output_tokens_sum"),
    )


async def test_the_picker_reads_queue_kv_cache_and_lora_metrics_of_real_vllm(pool):
    server = pool.servers[0]
    async with gateway(endpoints=endpoints(pool)) as (_, picker):
        idle = metrics_of(picker, server)
        assert (idle.cache_block_size, idle.cache_num_blocks) == (32, pool.settings.num_blocks)
        assert idle.served_models == {vllm.MODEL_NAME}
        assert (idle.waiting_queue_size, idle.running_requests) == (0, 0)

        def long_generation(model: str) -> dict[str, Any]:
            return completion(900, model=model, prompt=PROMPT, stream=True)

        async with aiohttp.ClientSession() as session:
            # Straight to the server: two run (max_num_seqs 2), the third waits.
            running = []
            for model in ("tiny-lora-1", vllm.MODEL_NAME):
                response = await session.post(
                    server.url + "/v1/completions", json=long_generation(model)
                )
                await response.content.readline()  # its first token: it is running
                running.append(response)
            waiting = asyncio.create_task(
                session.post(server.url + "/v1/completions", json=long_generation("tiny-lora-2"))
            )

            def loaded() -> bool:
                seen = metrics_of(picker, server)
                return seen.running_requests == 2 and seen.waiting_queue_size == 1

            await wait_for(loaded, timeout_s=30, what="2 running and 1 waiting request")
            busy = metrics_of(picker, server)
            assert 0 < busy.kv_cache_usage < 1
            assert busy.running_adapters == {"tiny-lora-1"}
            # vLLM 0.32.0 names every adapter with a request it has scheduled in both
            # labels (the counts behind them are dropped), and a request still waiting for
            # its first step in neither: `tiny-lora-2` shows nowhere yet.
            assert busy.waiting_adapters == {"tiny-lora-1"}
            assert busy.max_adapters == 2
            for response in running:
                response.close()  # vLLM aborts a request whose client went away
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                (await waiting).close()

        def drained() -> bool:
            seen = metrics_of(picker, server)
            return (seen.running_requests, seen.waiting_queue_size) == (0, 0)

        await wait_for(drained, timeout_s=30, what="the aborted requests to leave")


@pytest.mark.parametrize(
    ("path", "fields"),
    [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})],
    ids=["completions", "chat"],
)
async def test_an_answer_and_its_usage_pass_through_the_gateway(pool, path, fields):
    async with gateway(endpoints=endpoints(pool)) as (envoy, picker):
        before = token_totals()
        status, answer = await post(envoy, path, completion(7, **fields))
        assert status == 200, answer
        assert answer["model"] == vllm.MODEL_NAME
        assert answer["usage"]["completion_tokens"] == 7
        prompt_tokens = answer["usage"]["prompt_tokens"]
        await wait_for(picker.in_flight.is_idle, what="the request to finish")
        after = token_totals()
        assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (
            1,
            prompt_tokens,
            7,
        )


@pytest.mark.parametrize(
    ("path", "fields"),
    [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})],
    ids=["completions", "chat"],
)
async def test_streamed_usage_is_counted_by_the_picker(pool, path, fields):
    async with gateway(endpoints=endpoints(pool)) as (envoy, picker):
        before = token_totals()
        body = completion(5, stream=True, stream_options={"include_usage": True}, **fields)
        events = await post_streamed(envoy, path, body)
        usage = events[-1]["usage"]
        assert usage["completion_tokens"] == 5
        await wait_for(picker.in_flight.is_idle, what="the stream to finish")
        after = token_totals()
        assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (
            1,
            usage["prompt_tokens"],
            5,
        )


def _requests_counted_as(model: str) -> float:
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        for sample in family.samples
        if sample.name == "inference_objective_request_total"
        and sample.labels["model_name"] == model
    )


async def test_a_lora_adapter_is_served_and_counted_under_its_own_name(pool):
    async with gateway(endpoints=endpoints(pool)) as (envoy, picker):
        status, answer = await post(
            envoy, "/v1/completions", completion(3, prompt=PROMPT, model="tiny-lora-2")
        )
        assert status == 200, answer
        assert answer["model"] == "tiny-lora-2"
        assert answer["usage"]["completion_tokens"] == 3
        await wait_for(
            lambda: any(
                "tiny-lora-2" in metrics_of(picker, s).served_adapters for s in pool.servers
            ),
            timeout_s=30,
            what="the adapter in a scraped LoRA series",
        )
        # Idle servers: vLLM names an adapter in `vllm:lora_requests_info` only while it
        # has requests, yet the adapter is a model the pool serves, not an `other`.
        await wait_for(
            lambda: all(not metrics_of(picker, s).running_adapters for s in pool.servers),
            timeout_s=30,
            what="no adapter in use",
        )
        counted = _requests_counted_as("tiny-lora-2")
        status, answer = await post(
            envoy, "/v1/completions", completion(3, prompt=PROMPT, model="tiny-lora-2")
        )
        assert status == 200, answer
        assert answer["model"] == "tiny-lora-2"
        assert answer["usage"]["completion_tokens"] == 3
        assert _requests_counted_as("tiny-lora-2") == counted + 1


REWRITE_MANIFEST = """
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: default}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: PORT}]
  endpointPickerRef: {name: epp, port: {number: 9002}}
---
apiVersion: v1
kind: Pod
metadata: {name: vllm-0, namespace: default, labels: {app: vllm}}
status:
  podIP: ADDRESS
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: canary, namespace: default, creationTimestamp: "2025-01-01T00:00:00Z"}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {type: Exact, value: assistant}}]
    targets: [{modelRewrite: tiny-lora-1, weight: 100}]
"""


async def _unknown_to_vllm(server: vllm.VllmServer, model: str) -> None:
    """The alias alone is not a model vLLM serves: a 200 through the gateway proves the
    rewrite reached the server."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.url + "/v1/completions", json=completion(1, model=model, prompt=PROMPT)
        ) as r,
    ):
        assert r.status == 404, await r.text()


def _every_model_is(name: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda events: all(event["model"] == name for event in events)


async def test_an_inference_model_rewrite_reaches_vllm_and_the_client_sees_its_own_name(
    pool, tmp_path: Path
):
    server = pool.servers[0]
    await _unknown_to_vllm(server, "assistant")
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(
        REWRITE_MANIFEST.replace("PORT", str(server.port)).replace("ADDRESS", server.address)
    )
    async with gateway(manifests=(manifest,), pool_name="pool") as (envoy, _):
        status, answer = await post(
            envoy, "/v1/completions", completion(4, model="assistant", prompt=PROMPT)
        )
        assert status == 200, answer
        assert answer["model"] == "assistant"
        events = await post_streamed(
            envoy,
            "/v1/chat/completions",
            completion(4, model="assistant", messages=MESSAGES, stream=True),
        )
        assert events and _every_model_is("assistant")(events)


async def test_the_rewrite_header_reaches_vllm_and_the_client_sees_its_own_name(pool):
    await _unknown_to_vllm(pool.servers[0], "my-alias")
    async with gateway(endpoints=endpoints(pool)) as (envoy, _):
        header = {"x-gateway-model-name-rewrite": "tiny-lora-2"}
        status, answer = await post(
            envoy, "/v1/completions", completion(4, model="my-alias", prompt=PROMPT), **header
        )
        assert status == 200, answer
        assert answer["model"] == "my-alias"
        events = await post_streamed(
            envoy,
            "/v1/completions",
            completion(4, model="my-alias", prompt=PROMPT, stream=True),
            **header,
        )
        assert events and _every_model_is("my-alias")(events)
