"""`sluice picker` as a user runs it: a real process, flags, health, metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.gateway.ports import free_tcp_port
from tests.support.backends import backends


async def run_picker(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice.cli",
        "picker",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grpc-port", "nope"], "argument --grpc-port: expected a port number"),
        (["--secure-serving=maybe"], "expected true or false"),
        (["--refresh-metrics-interval", "fast"], "expected a duration"),
        (["--endpoints", "localhost:80"], "'localhost' in 'localhost:80' is not an IP address"),
        (
            [
                "--config-text",
                "apiVersion: inference.networking.x-k8s.io/v1alpha1\n"
                "kind: EndpointPickerConfig\nplugins: [{type: nope}]",
            ],
            "'nope'",
        ),
        (["--manifests", "/nonexistent.yaml"], "cannot read"),
    ],
)
async def test_bad_flags_exit_non_zero_with_one_line(args, message):
    process = (
        await run_picker(*args, "--grpc-port", "0")
        if "--grpc-port" not in args
        else await run_picker(*args)
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode != 0
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]


async def test_serves_health_and_metrics_then_stops_on_sigterm():
    grpc_port, health_port, metrics_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    async with backends(["127.0.0.2"]) as servers:
        process = await run_picker(
            "--endpoints",
            servers[0].target,
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(grpc_port),
            "--grpc-health-port",
            str(health_port),
            "--metrics-port",
            str(metrics_port),
            "--secure-serving=false",
        )
        try:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{health_port}")
            stub = health_pb2_grpc.HealthStub(channel)

            async def serving(service: str) -> bool:
                try:
                    answer = await stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=1
                    )
                except grpc.aio.AioRpcError:
                    return False
                return answer.status == health_pb2.HealthCheckResponse.SERVING

            for service in (
                "",
                "liveness",
                "readiness",
                "envoy.service.ext_proc.v3.ExternalProcessor",
            ):
                deadline = asyncio.get_running_loop().time() + 30
                while not await serving(service):
                    assert asyncio.get_running_loop().time() < deadline, service
                    await asyncio.sleep(0.05)
            await channel.close()

            async with aiohttp.ClientSession() as session:
                text = ""

                async def scraped() -> None:
                    nonlocal text
                    async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                        text = await r.text()

                async def gauges_present() -> bool:
                    await scraped()
                    return 'inference_pool_ready_pods{name="static"} 1.0' in text

                deadline = asyncio.get_running_loop().time() + 30
                while not await gauges_present():
                    assert asyncio.get_running_loop().time() < deadline, text
                    await asyncio.sleep(0.05)
                assert "inference_extension_scheduler_e2e_duration_seconds" in text
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
        assert process.returncode == 0
