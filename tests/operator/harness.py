"""Starts the real operator (picker thread + kopf thread) against an emulated cluster."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from epp_operator.runtime import OperatorRuntime
from epp_operator.settings import OperatorOptions

from epp.picker import PickerOptions
from tests.operator.cluster import Cluster
from tests.support.extproc_client import (
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    set_headers,
)
from tests.support.picker import wait_for

NAMESPACE = "inference"
POOL = "llm"


def pool(port: int, name: str = POOL, selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": selector or {"app": "vllm"}},
            "targetPorts": [{"number": port}],
            "endpointPickerRef": {"name": "sluice", "port": {"number": 9002}},
        },
    }


def pod(name: str, ip: str, *, ready: bool = True, labels: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels or {"app": "vllm"}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {"podIP": ip, "conditions": [ready_condition(ready)]},
    }


def ready_condition(ready: bool) -> dict[str, str]:
    return {"type": "Ready", "status": "True" if ready else "False"}


def operator_options(cluster: Cluster, **overrides: Any) -> OperatorOptions:
    picker = PickerOptions(
        host="127.0.0.1",
        grpc_port=0,
        health_port=0,
        metrics_port=0,
        secure_serving=False,
        refresh_metrics_interval_s=0.02,
        shutdown_grace_s=0.5,
    )
    options = OperatorOptions(
        picker=picker,
        pool_name=POOL,
        pool_namespace=NAMESPACE,
        liveness_port=0,
        api_server=cluster.gate.url,
        reconnect_backoff_s=0.05,
        watch_connect_timeout_s=1.0,
        request_timeout_s=5.0,
        shutdown_grace_s=0.5,
    )
    return dataclasses.replace(options, **overrides)


@contextlib.asynccontextmanager
async def running_operator(cluster: Cluster, **overrides: Any) -> AsyncIterator[OperatorRuntime]:
    runtime = OperatorRuntime(operator_options(cluster, **overrides))
    await asyncio.to_thread(runtime.start)
    try:
        yield runtime
    finally:
        await asyncio.to_thread(runtime.stop)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    await wait_for(condition, timeout_s=timeout_s, what=what)


def endpoint_addresses(runtime: OperatorRuntime) -> set[str]:
    return {e.address for e in runtime.reconciler.current.endpoints}


async def route(client: ExtProcClient, model: str = "m", **headers: str) -> dict[str, str]:
    """One request's headers + body through the picker; the headers it set."""
    call = client.open()
    body = orjson.dumps({"model": model, "prompt": "hello"})
    await call.write(request_headers(completion_headers(**headers)))
    await call.write(request_body(body))
    first = await call.read()
    call.cancel()
    return set_headers(first)
