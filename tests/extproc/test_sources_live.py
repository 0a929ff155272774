"""Sources change while requests flow: nothing is dropped, new snapshots take over."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from epp.extproc.server import load_or_create_tls
from tests.support.backends import backends
from tests.support.extproc_client import (
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    set_headers,
)
from tests.support.picker import running_picker, wait_for

POOL = """
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: default}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: PORT}]
"""
POD = """---
apiVersion: v1
kind: Pod
metadata: {name: NAME, namespace: default, labels: {app: vllm}}
status:
  podIP: ADDRESS
  conditions: [{type: Ready, status: "True"}]
"""


def manifest(port: int, pods: dict[str, str]) -> str:
    text = POOL.replace("PORT", str(port))
    for name, address in pods.items():
        text += POD.replace("NAME", name).replace("ADDRESS", address)
    return text


async def test_manifest_change_moves_traffic_without_dropping_requests(tmp_path):
    addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    async with backends(addresses, same_port=True) as servers:
        port = servers[0].port
        path = tmp_path / "pool.yaml"
        path.write_text(manifest(port, {"a": "127.0.0.2"}))
        async with running_picker(manifests=(path,), pool_name="pool") as picker:
            client = ExtProcClient(picker.grpc_port)
            seen: list[str] = []
            failures: list[str] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    call = client.open()
                    await call.write(request_headers(completion_headers()))
                    await call.write(request_body(orjson.dumps({"model": "m", "prompt": "x"})))
                    response = await call.read()
                    call.cancel()
                    if response.WhichOneof("response") != "request_headers":
                        failures.append(str(response))
                    else:
                        seen.append(set_headers(response)["x-gateway-destination-endpoint"])

            task = asyncio.create_task(traffic())
            await wait_for(lambda: len(seen) > 20, what="traffic to the first pod")
            path.write_text(manifest(port, {"b": "127.0.0.3", "c": "127.0.0.4"}))
            target_b, target_c = f"127.0.0.3:{port}", f"127.0.0.4:{port}"
            await wait_for(
                lambda: target_b in seen[-10:] or target_c in seen[-10:],
                what="traffic moving to the new pods",
            )
            await wait_for(lambda: len(seen) > 100, what="more traffic")
            stop.set()
            await task
            await client.close()
    assert failures == []
    switch = max(i for i, target in enumerate(seen) if target == f"127.0.0.2:{port}")
    assert set(seen[switch + 1 :]) <= {target_b, target_c}


def test_cert_path_supplies_the_serving_certificate(tmp_path):
    generated = load_or_create_tls(None)
    (tmp_path / "tls.crt").write_bytes(generated.certificate)
    (tmp_path / "tls.key").write_bytes(generated.private_key)
    loaded = load_or_create_tls(tmp_path)
    assert loaded.certificate == generated.certificate
    assert loaded.certificate.startswith(b"-----BEGIN CERTIFICATE-----")


def test_missing_cert_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"--cert-path .*No such file"):
        load_or_create_tls(tmp_path / "nope")
