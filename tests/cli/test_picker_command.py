"""`sluice picker` as a user runs it: a real process, flags, health, metrics, SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp import arguments
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
        (
            ["--refresh-metrics-interval", "5"],
            "argument --refresh-metrics-interval: '5' has no unit (write 5s or 5ms)",
        ),
        (["--metrics-staleness-threshold", "0.5"], "'0.5' has no unit (write 0.5s or 0.5ms)"),
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


@pytest.mark.parametrize(
    ("text", "seconds"), [("0", 0.0), ("50ms", 0.05), ("1m30s", 90.0), ("1.5s", 1.5)]
)
def test_durations_with_units(text, seconds):
    assert arguments.duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5", "'5' has no unit (write 5s or 5ms)"),
        ("-5s", "must not be negative"),
        ("5x", "expected a duration like '50ms', '2s' or '1m30s', got '5x'"),
    ],
)
def test_durations_without_units_are_rejected(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        arguments.duration(text)
    assert str(info.value) == message or message in str(info.value)


async def test_bad_config_file_names_the_file(tmp_path: Path):
    path = tmp_path / "epp.yaml"
    path.write_text(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
        "plugins: [{type: queue-scorer}\n"
    )
    process = await run_picker("--config-file", str(path), "--grpc-port", "0")
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    (line,) = stderr.decode().strip().splitlines()
    assert line.startswith(f"sluice picker: --config-file {path}: invalid YAML at line 4"), line


async def start_then_stop(*args: str) -> list[str]:
    """Run the picker until its start-up line, stop it, and return its stderr lines."""
    process = await run_picker(
        "--host", "127.0.0.1", "--grpc-port", "0", "--grpc-health-port", "0",
        "--metrics-port", "0", "--secure-serving=false", *args,
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[str] = []
    while not any("ext_proc on" in line for line in lines):
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        assert line, f"picker ended before starting: {lines}"
        lines.append(line.decode().rstrip("\n"))
    process.send_signal(signal.SIGTERM)
    _, rest = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    return lines + rest.decode().splitlines()


def warnings(lines: list[str]) -> list[str]:
    """Warnings about the pool's sources (not scrape failures of the made-up endpoints)."""
    sources = ("logger=epp.cli ", "logger=epp.datastore.sources ")
    return [line for line in lines if "level=warning" in line and any(s in line for s in sources)]


async def test_warns_when_there_is_no_pool_source():
    (line,) = warnings(await start_then_stop())
    assert 'msg="no --endpoints and no --manifests: the pool is empty' in line


async def test_warns_how_endpoints_and_manifests_combine(tmp_path: Path):
    manifests = tmp_path / "pool.yaml"
    manifests.write_text(POOL_AND_POD)
    args = ("--endpoints", "127.0.0.3:1", "--manifests", str(manifests))
    (line,) = warnings(await start_then_stop(*args))
    assert (
        "--endpoints and --manifests both given: neither wins, the pool is the --endpoints "
        "plus the Pods the manifests' InferencePool selects"
    ) in line


async def test_warns_when_manifests_route_to_nothing(tmp_path: Path):
    manifests = tmp_path / "pool.yaml"
    manifests.write_text(POOL_AND_POD.replace("app: vllm\nstatus", "app: sglang\nstatus"))
    (line,) = warnings(await start_then_stop("--manifests", str(manifests)))
    assert f"{manifests}: nothing to route to: InferencePool default/pool selects no Pod" in line


async def test_no_warning_for_manifests_that_route(tmp_path: Path):
    manifests = tmp_path / "pool.yaml"
    manifests.write_text(POOL_AND_POD)
    assert warnings(await start_then_stop("--manifests", str(manifests))) == []


POOL_AND_POD = """\
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 1}]
  endpointPickerRef: {name: sluice, port: {number: 9002}}
---
apiVersion: v1
kind: Pod
metadata:
  name: vllm-0
  labels:
    app: vllm
status: {podIP: 127.0.0.2, conditions: [{type: Ready, status: "True"}]}
"""


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
