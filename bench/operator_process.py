"""`sluice operator` as a child process for the benchmarks, and a one-request probe."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import PYTHON, child
from bench.operator_cluster import NAMESPACE, POOL
from sluice.gateway.ports import free_tcp_port
from tests.support.extproc_client import (
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    set_headers,
)

BODY = orjson.dumps({"model": "sim-model", "prompt": "hello there", "max_tokens": 1})


@contextlib.asynccontextmanager
async def operator(
    api_url: str, extra: Sequence[str] = ()
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """The operator + embedded picker, ready (gRPC health SERVING); yields it and its port."""
    port, health, metrics = free_tcp_port(), free_tcp_port(), free_tcp_port()
    async with child(
        PYTHON, "-m", "sluice.cli", "operator",
        "--pool-name", POOL, "--pool-namespace", NAMESPACE,
        "--api-server", api_url, "--host", "127.0.0.1",
        "--grpc-port", str(port), "--grpc-health-port", str(health),
        "--metrics-port", str(metrics), "--secure-serving=false",
        "--liveness-port", "0", "--reconnect-backoff", "100ms",
        *extra,
    ) as process:  # fmt: skip
        deadline = time.monotonic() + 60
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"))
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the operator never turned ready")
                await asyncio.sleep(0.05)
        yield process, port


async def probe(client: ExtProcClient) -> str | None:
    """One request's scheduling decision: the chosen ip:port, or None (no endpoint)."""
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(BODY))
    first = await call.read()
    call.cancel()
    if first is grpc.aio.EOF or first.WhichOneof("response") == "immediate_response":
        return None
    return set_headers(first).get("x-gateway-destination-endpoint")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
