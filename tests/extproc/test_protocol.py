"""Black-box protocol tests: gRPC `Process` streams straight to a running picker."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import REGISTRY as _UNUSED  # noqa: F401  (the picker has its own)

from epp import metrics
from tests.support.backends import backends
from tests.support.extproc_client import (
    BUFFERED,
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
    streamed_bodies,
)
from tests.support.picker import fresh_metrics, running_picker, wait_for
from tests.support.text import replaced

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
COMPLETION = orjson.dumps({"model": "m", "prompt": "hello world"})


async def route(client: ExtProcClient, body: bytes = COMPLETION, **headers: str) -> list:
    call = client.open()
    await call.write(request_headers(completion_headers(**headers)))
    await call.write(request_body(body))
    first = await call.read()
    out = [first]
    if first.WhichOneof("response") == "request_headers":
        while True:
            message = await call.read()
            out.append(message)
            if message.request_body.response.body_mutation.streamed_response.end_of_stream:
                break
    call.cancel()
    return out


@pytest.fixture
async def pool():
    async with backends(ADDRESSES) as servers:
        endpoints = ",".join(s.target for s in servers)
        async with running_picker(endpoints=endpoints) as picker:
            client = ExtProcClient(picker.grpc_port)
            await fresh_metrics(picker)
            yield servers, picker, client
            await client.close()


async def test_lowest_queue_and_kv_wins(pool):
    servers, picker, client = pool
    servers[0].state.waiting, servers[0].state.kv = 5, 0.5
    servers[1].state.waiting, servers[1].state.kv = 0, 0.1
    servers[2].state.waiting, servers[2].state.kv = 3, 0.9
    await fresh_metrics(picker)
    responses = await route(client)
    headers = set_headers(responses[0])
    assert headers["x-gateway-destination-endpoint"] == servers[1].target
    assert (
        responses[0]
        .dynamic_metadata.fields["envoy.lb"]
        .struct_value.fields["x-gateway-destination-endpoint"]
        .string_value
        == servers[1].target
    )
    assert headers["content-length"] == str(len(COMPLETION))
    assert streamed_bodies(responses, "request_body") == COMPLETION


LORA_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: queue-scorer}
- {type: kv-cache-utilization-scorer}
- {type: lora-affinity-scorer}
- {type: max-score-picker}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 1}
  - {pluginRef: kv-cache-utilization-scorer, weight: 1}
  - {pluginRef: lora-affinity-scorer, weight: 2}
  - {pluginRef: max-score-picker}
"""


async def test_active_lora_adapter_wins_over_lower_kv():
    async with backends(ADDRESSES) as servers:
        endpoints = ",".join(s.target for s in servers)
        async with running_picker(endpoints=endpoints, config_text=LORA_CONFIG) as picker:
            client = ExtProcClient(picker.grpc_port)
            await _lora_case(servers, picker, client)
            await client.close()


async def _lora_case(servers, picker, client):
    for s in servers:
        s.state.max_lora = 2
    servers[0].state.kv = 0.05
    servers[1].state.kv = 0.4
    servers[1].state.running_loras = ["sql-lora"]
    servers[2].state.kv = 0.05
    servers[2].state.running_loras = ["a", "b"]  # full, adapter not loaded
    servers[0].state.running_loras = ["x", "y"]
    await fresh_metrics(picker)
    body = orjson.dumps({"model": "sql-lora", "prompt": "select"})
    headers = set_headers((await route(client, body))[0])
    assert headers["x-gateway-destination-endpoint"] == servers[1].target


async def test_header_only_request_without_endpoints_is_500():
    async with running_picker(endpoints="") as picker:
        client = ExtProcClient(picker.grpc_port)
        responses = await client.exchange(
            [request_headers({":method": "GET", ":path": "/v1/models"}, end_of_stream=True)], 1
        )
        await client.close()
    immediate = responses[0].immediate_response
    assert immediate.status.code == 500
    assert immediate.body.startswith(b"inference error: ")


async def test_header_only_request_goes_to_a_ready_endpoint(pool):
    servers, picker, client = pool
    call = client.open()
    await call.write(request_headers({":method": "GET", ":path": "/v1/models"}, end_of_stream=True))
    response = await call.read()
    assert set_headers(response)["x-gateway-destination-endpoint"] in {s.target for s in servers}
    # The request holds its slot while upstream answers; the stream's end releases it.
    assert picker.in_flight.in_flight == 1
    await call.done_writing()
    await wait_for(picker.in_flight.is_idle, what="the header-only request's release")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"prompt": "hi"}', b"'model' is required"),
        (b'{"model": "m", "prompt": ', b"not valid JSON"),
        (b'{"model": 7, "prompt": "x"}', b"'model' must be a non-empty string"),
        (b"[1, 2]", b"must be a JSON object"),
        (b'{"model": "m"}', b"'prompt' is required"),
    ],
)
async def test_bad_bodies_are_400(pool, body, fragment):
    _, picker, client = pool
    responses = await route(client, body)
    immediate = responses[0].immediate_response
    assert immediate.status.code == 400
    assert immediate.body.startswith(b"inference error: BadRequest - ")
    assert fragment in immediate.body
    assert picker.in_flight.is_idle()


async def test_chat_needs_non_empty_messages(pool):
    _, _, client = pool
    call = client.open()
    await call.write(request_headers(completion_headers("/v1/chat/completions")))
    await call.write(request_body(b'{"model": "m", "messages": []}'))
    response = await call.read()
    assert response.immediate_response.status.code == 400
    assert b"messages" in response.immediate_response.body
    call.cancel()


async def test_body_split_across_chunks(pool):
    servers, _, client = pool
    body = orjson.dumps({"model": "m", "prompt": "x" * 150_000})
    call = client.open()
    await call.write(request_headers(completion_headers()))
    for i in range(0, len(body), 10_000):
        await call.write(request_body(body[i : i + 10_000], end_of_stream=i + 10_000 >= len(body)))
    responses = [await call.read()]
    while not responses[-1].request_body.response.body_mutation.streamed_response.end_of_stream:
        responses.append(await call.read())
    call.cancel()
    assert set_headers(responses[0])["x-gateway-destination-endpoint"] in {
        s.target for s in servers
    }
    chunks = [r.request_body.response.body_mutation.streamed_response.body for r in responses[1:]]
    assert all(len(c) <= 62_000 for c in chunks)
    assert b"".join(chunks) == body  # byte-for-byte, no re-serialisation


async def test_subset_hint(pool):
    servers, picker, client = pool
    servers[0].state.waiting = 0
    servers[1].state.waiting = 4
    servers[2].state.waiting = 9
    await fresh_metrics(picker)

    async def pick(subset: list[str]) -> object:
        call = client.open()
        await call.write(request_headers(completion_headers(), subset=subset))
        await call.write(request_body(COMPLETION))
        response = await call.read()
        call.cancel()
        return response

    best_in_subset = await pick([servers[1].target, servers[2].target])
    assert set_headers(best_in_subset)["x-gateway-destination-endpoint"] == servers[1].target
    partial = await pick([servers[2].target, "10.255.0.1:8000"])
    assert set_headers(partial)["x-gateway-destination-endpoint"] == servers[2].target
    nothing = await pick(["10.255.0.1:8000"])
    assert nothing.immediate_response.status.code == 503
    empty = await pick([])
    assert empty.immediate_response.status.code == 503


async def test_model_rewrite_by_header(pool):
    _, picker, client = pool
    body = b'{"model":  "m", "prompt": "hi", "extra": {"keep": [1, 2.50]}}'
    call = client.open()
    await call.write(
        request_headers(completion_headers(**{"x-gateway-model-name-rewrite": "m-v2"}))
    )
    await call.write(request_body(body))
    first, second = await call.read(), await call.read()
    forwarded = second.request_body.response.body_mutation.streamed_response.body
    assert forwarded == b'{"model":  "m-v2", "prompt": "hi", "extra": {"keep": [1, 2.50]}}'
    assert set_headers(first)["content-length"] == str(len(forwarded))
    assert "x-gateway-model-name-rewrite" not in set_headers(first)
    # The response names the model the client asked for.
    await call.write(response_headers(200))
    await call.read()
    await call.write(
        response_body(b'{"model":"m-v2","usage":{"prompt_tokens":2,"completion_tokens":1}}', True)
    )
    answer = await call.read()
    assert answer.response_body.response.body_mutation.streamed_response.body == (
        b'{"model":"m","usage":{"prompt_tokens":2,"completion_tokens":1}}'
    )
    await call.done_writing()
    assert picker.in_flight.is_idle()


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
  podIP: 127.0.0.2
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: canary, namespace: default, creationTimestamp: "2025-01-01T00:00:00Z"}
spec:
  poolRef: {name: pool}
  rules:
  - matches: [{model: {type: Exact, value: llama}}]
    targets: [{modelRewrite: llama-v2, weight: 100}]
"""


async def test_model_rewrite_by_inference_model_rewrite(tmp_path):
    async with backends(["127.0.0.2"]) as servers:
        manifest = tmp_path / "pool.yaml"
        manifest.write_text(REWRITE_MANIFEST.replace("PORT", str(servers[0].port)))
        async with running_picker(manifests=(manifest,), pool_name="pool") as picker:
            client = ExtProcClient(picker.grpc_port)
            body = orjson.dumps({"model": "llama", "prompt": "hi"})
            responses = await route(
                client, body, **{"x-gateway-model-name-rewrite": "ignored-by-rule"}
            )
            await client.close()
    assert set_headers(responses[0])["x-gateway-destination-endpoint"] == servers[0].target
    assert streamed_bodies(responses, "request_body") == b'{"model":"llama-v2","prompt":"hi"}'


async def test_multi_chunk_json_response_is_reassembled(pool):
    _, picker, client = pool
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(COMPLETION))
    await call.read(), await call.read()
    await call.write(response_headers(200))
    assert (await call.read()).WhichOneof("response") == "response_headers"
    payload = orjson.dumps(
        {
            "model": "m",
            "choices": [{"text": "y" * 150_000}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5},
        }
    )
    pieces = [payload[i : i + 40_000] for i in range(0, len(payload), 40_000)]
    for i, piece in enumerate(pieces):
        await call.write(response_body(piece, end_of_stream=i == len(pieces) - 1))
    out = [await call.read()]
    while not out[-1].response_body.response.body_mutation.streamed_response.end_of_stream:
        out.append(await call.read())
    await call.done_writing()
    chunks = [r.response_body.response.body_mutation.streamed_response.body for r in out]
    assert all(len(c) <= 62_000 for c in chunks)
    assert b"".join(chunks) == payload
    assert picker.in_flight.is_idle()


def _histogram_sum(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(f"{name}_sum", labels)
    return value or 0.0


async def test_sse_usage_counted_into_input_tokens(pool):
    _, picker, client = pool
    # "m" is what the test backends report serving: an unknown name would be labelled "other".
    labels = {"model_name": "m", "target_model_name": "m", "priority": "0"}
    before = _histogram_sum("inference_objective_input_tokens", **labels)
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(orjson.dumps({"model": "m", "prompt": "x", "stream": True})))
    await call.read(), await call.read()
    await call.write(response_headers(200, "text/event-stream"))
    await call.read()
    events = [
        b'data: {"choices":[{"text":"a"}],"usage":null}\n\n',
        b'data: {"choices":[{"text":"b"}],"usage":null}\n\ndata: {"choices":[],"us',
        b'age":{"prompt_tokens":42,"completion_tokens":2}}\n\ndata: [DONE]\n\n',
    ]
    passed = b""
    for i, event in enumerate(events):
        await call.write(response_body(event, end_of_stream=i == len(events) - 1))
        passed += (await call.read()).response_body.response.body_mutation.streamed_response.body
    await call.done_writing()
    assert passed == b"".join(events)  # streamed through chunk by chunk, unchanged
    assert _histogram_sum("inference_objective_input_tokens", **labels) - before == 42
    assert picker.in_flight.is_idle()


async def test_buffered_mode_routes_on_the_body_response(pool):
    servers, _, client = pool
    call = client.open()
    await call.write(
        request_headers(completion_headers(), request_mode=BUFFERED, response_mode=BUFFERED)
    )
    ack = await call.read()
    assert ack.WhichOneof("response") == "request_headers"
    assert not ack.request_headers.response.header_mutation.set_headers
    await call.write(request_body(COMPLETION))
    routed = await call.read()
    assert routed.WhichOneof("response") == "request_body"
    assert set_headers(routed)["x-gateway-destination-endpoint"] in {s.target for s in servers}
    assert not routed.request_body.response.body_mutation.body  # unchanged body is not resent
    call.cancel()


async def test_echoes_client_headers_but_not_system_ones(pool):
    _, _, client = pool
    call = client.open()
    await call.write(
        request_headers(
            completion_headers(
                **{
                    "x-custom": "keep-me",
                    "x-request-id": "req-123",
                    "x-gateway-destination-endpoint": "1.2.3.4:80",
                    "x-gateway-inference-objective": "whatever",
                }
            )
        )
    )
    await call.write(request_body(COMPLETION))
    headers = set_headers(await call.read())
    call.cancel()
    assert headers["x-custom"] == "keep-me"
    assert headers["x-request-id"] == "req-123"
    assert headers["x-gateway-destination-endpoint"] != "1.2.3.4:80"
    assert "x-gateway-inference-objective" not in headers
    assert not any(k.startswith(":") for k in headers)


async def test_generates_request_id_when_absent(pool):
    _, _, client = pool
    headers = set_headers((await route(client))[0])
    assert len(headers["x-request-id"]) == 36


OBJECTIVE_MANIFEST = (
    REWRITE_MANIFEST.split("---\napiVersion: inference.networking.x-k8s.io")[0]
    + """---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: critical, namespace: default}
spec: {priority: 7, poolRef: {name: pool}}
"""
)


async def test_objective_header_sets_the_request_priority(tmp_path):
    async with backends(["127.0.0.2"]) as servers:
        manifest = tmp_path / "pool.yaml"
        manifest.write_text(OBJECTIVE_MANIFEST.replace("PORT", str(servers[0].port)))
        async with running_picker(manifests=(manifest,), pool_name="pool") as picker:
            client = ExtProcClient(picker.grpc_port)
            labels = {"model_name": "m", "target_model_name": "m", "priority": "7"}
            before = (
                metrics.REGISTRY.get_sample_value("inference_objective_request_total", labels) or 0
            )
            await fresh_metrics(picker)  # the model is known once its server was scraped
            body = orjson.dumps({"model": "m", "prompt": "hi"})
            await route(client, body, **{"x-gateway-inference-objective": "critical"})
            await client.close()
            after = metrics.REGISTRY.get_sample_value("inference_objective_request_total", labels)
    assert after == before + 1


SHEDDABLE_MANIFEST = replaced(
    replaced(OBJECTIVE_MANIFEST, "priority: 7", "priority: -1"), "name: critical", "name: batch"
)


async def test_sheddable_request_is_429_while_the_pool_is_saturated(tmp_path):
    async with backends(["127.0.0.2"]) as servers:
        manifest = tmp_path / "pool.yaml"
        manifest.write_text(SHEDDABLE_MANIFEST.replace("PORT", str(servers[0].port)))
        async with running_picker(manifests=(manifest,), pool_name="pool") as picker:
            client = ExtProcClient(picker.grpc_port)
            await fresh_metrics(picker)
            body = orjson.dumps({"model": "m", "prompt": "hi"})
            routed = await route(client, body, **{"x-gateway-inference-objective": "batch"})
            assert "x-gateway-destination-endpoint" in set_headers(routed[0])
            servers[0].state.waiting = 10  # queue / queueDepthThreshold (5) = 2: saturated
            await fresh_metrics(picker)
            shed = await route(client, body, **{"x-gateway-inference-objective": "batch"})
            assert shed[0].immediate_response.status.code == 429
            assert b"sheddable request dropped" in shed[0].immediate_response.body
            normal = await route(client, body)  # priority 0 is never shed
            assert "x-gateway-destination-endpoint" in set_headers(normal[0])
            await client.close()
            await wait_for(picker.in_flight.is_idle, what="every slot released")
