"""Several picker replicas behind one Envoy (`GatewayOptions.picker_endpoints`), with stub
pickers: the ext_proc streams are spread over the replicas, and a replica that is down is
left out once its health check fails, so FailClose requests keep being served."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from sluice.gateway import envoy_process
from sluice.gateway.settings import FailureMode, GatewayOptions
from tests.gateway import ext_proc_stub as stub
from tests.gateway.conftest import Backend
from tests.gateway.harness import FULL_DUPLEX, post, refused_port

pytestmark = pytest.mark.envoy


@contextlib.asynccontextmanager
async def stub_pickers(
    destination: str, count: int
) -> AsyncIterator[list[tuple[int, stub.StubPicker]]]:
    servers = [await stub.serve(stub.StubBehaviour(destination=destination)) for _ in range(count)]
    try:
        yield [(port, picker) for _, port, picker in servers]
    finally:
        for server, _, _ in servers:
            await stub.stop(server)


def _options(ports: list[int], **extra: object) -> GatewayOptions:
    return GatewayOptions(
        picker_endpoints=tuple(("127.0.0.1", port) for port in ports),
        request_body_mode=FULL_DUPLEX,
        response_body_mode=FULL_DUPLEX,
        **extra,  # type: ignore[arg-type]
    )


async def test_streams_are_spread_round_robin_over_the_replicas(
    backends: tuple[Backend, Backend],
) -> None:
    target = backends[0]
    async with stub_pickers(target.address, 2) as replicas:
        # One Envoy worker: one round-robin sequence, so requests alternate exactly.
        options = _options([port for port, _ in replicas])
        async with envoy_process.EnvoyProcess(options, concurrency=1) as envoy:
            for i in range(6):
                status, _ = await post(envoy.url + "/v1/completions", f'{{"n": {i}}}'.encode())
                assert status == 200
    assert [len(picker.streams) for _, picker in replicas] == [3, 3]
    assert len(target.bodies) == 6


async def test_a_replica_that_is_down_is_skipped_after_its_health_check(
    backends: tuple[Backend, Backend],
) -> None:
    target = backends[1]
    async with stub_pickers(target.address, 1) as [(port, picker)]:
        with refused_port() as down:
            options = _options([port, down], failure_mode=FailureMode.FAIL_CLOSE)
            async with envoy_process.EnvoyProcess(options, concurrency=1) as envoy:
                await _until_health_check_failed(envoy, f"127.0.0.1:{down}")
                for i in range(4):
                    status, _ = await post(envoy.url + "/v1/completions", f'{{"n": {i}}}'.encode())
                    assert status == 200
    assert len(picker.streams) == 4
    assert len(target.bodies) == 4


async def _until_health_check_failed(envoy: envoy_process.EnvoyProcess, address: str) -> None:
    """Poll Envoy's admin /clusters (no event to await) until `address` fails its check."""
    prefix = f"endpoint_picker::{address}::health_flags::"
    deadline = time.monotonic() + 10
    while True:
        clusters = await envoy.admin_get("/clusters")
        flags = [line for line in clusters.splitlines() if line.startswith(prefix)]
        if any("failed_active_hc" in line for line in flags):
            return
        assert time.monotonic() < deadline, f"Envoy never failed {address}: {flags}"
        await asyncio.sleep(0.05)
