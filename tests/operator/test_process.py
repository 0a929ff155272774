"""`sluice operator` as a process: flags, readiness over gRPC health, liveness, SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.gateway.ports import free_tcp_port
from tests.operator.cluster import Cluster, emulated_cluster
from tests.operator.harness import NAMESPACE, POOL, pod, pool
from tests.operator.model_servers import model_servers
from tests.support.extproc_client import (
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    response_body,
    response_headers,
)


async def _operator(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice.cli",
        "operator",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--pool-namespace", "x"), 2, "--pool-name is required"),
        (("--pool-name", "p", "--config-file", "/nonexistent.yaml"), 1, "/nonexistent.yaml"),
        (
            ("--pool-name", "p", "--grpc-port", "0", "--config-text", "plugins: 7"),
            1,
            "apiVersion missing",
        ),
    ],
)
async def test_bad_flags_exit_non_zero_with_one_line(args, code, message) -> None:
    process = await _operator(*args, "--liveness-port", "0", "--api-server", "http://127.0.0.1:9")
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == code
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


async def _serving(health_port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"))
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def _wait_serving(health_port: int, process: asyncio.subprocess.Process) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while not await _serving(health_port):
        assert process.returncode is None, "the operator exited"
        assert asyncio.get_running_loop().time() < deadline, "never turned SERVING"
        await asyncio.sleep(0.05)


async def _setup(cluster: Cluster, port: int) -> None:
    await cluster.create(pool(port))
    await cluster.create(pod("a", "127.0.0.2"))


async def test_ready_live_then_sigterm_drains_in_flight_requests() -> None:
    grpc_port, health_port, metrics_port, live_port = (free_tcp_port() for _ in range(4))
    async with emulated_cluster() as cluster, model_servers(["127.0.0.2"]) as servers:
        await _setup(cluster, servers[0].port)
        process = await _operator(
            "--pool-name", POOL, "--pool-namespace", NAMESPACE,
            "--api-server", cluster.gate.url, "--host", "127.0.0.1",
            "--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
            "--metrics-port", str(metrics_port), "--secure-serving=false",
            "--liveness-host", "127.0.0.1", "--liveness-port", str(live_port),
            "--shutdown-grace-period", "10s",
        )  # fmt: skip
        client = ExtProcClient(grpc_port)
        try:
            await _wait_serving(health_port, process)
            live = f"http://127.0.0.1:{live_port}/healthz"
            async with aiohttp.ClientSession() as session, session.get(live) as response:
                assert response.status == 200

            # A request in flight when SIGTERM arrives still completes.
            call = client.open()
            await call.write(request_headers(completion_headers()))
            await call.write(request_body(orjson.dumps({"model": "m", "prompt": "hi"})))
            await call.read()
            await call.read()
            process.send_signal(signal.SIGTERM)
            deadline = asyncio.get_running_loop().time() + 10
            while await _serving(health_port):  # readiness drops first
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
            await call.write(response_headers())
            await call.read()
            await call.write(response_body(b'{"choices":[]}', end_of_stream=True))
            reply = await call.read()
            assert reply is not grpc.aio.EOF and reply.WhichOneof("response") == "response_body"
            await call.done_writing()
            await asyncio.wait_for(process.wait(), 30)
        finally:
            await client.close()
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, (await process.stderr.read()).decode()  # type: ignore[union-attr]
