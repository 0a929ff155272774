"""The picker-less configurations through a real Envoy: direct and original-dst."""

from __future__ import annotations

import collections
import hashlib
import os

import aiohttp
import pytest

from sluice.gateway import envoy_process, settings
from tests.gateway.conftest import SSE_EVENTS, Backend
from tests.gateway.harness import read_sse_releasing_each

pytestmark = pytest.mark.envoy

HEADER = settings.DESTINATION_HEADER


async def test_direct_mode_round_robins_across_backends(backends: tuple[Backend, Backend]) -> None:
    options = settings.GatewayOptions(
        mode=settings.GatewayMode.DIRECT, backends=tuple(b.address for b in backends)
    )
    async with envoy_process.EnvoyProcess(options) as envoy, aiohttp.ClientSession() as session:
        served: collections.Counter[str] = collections.Counter()
        for _ in range(10):
            async with session.get(envoy.url + "/v1/models") as response:
                assert response.status == 200
                served[(await response.json())["pod"]] += 1
    assert served == {"alpha": 5, "beta": 5}


async def test_direct_mode_least_request_uses_every_backend(
    backends: tuple[Backend, Backend],
) -> None:
    options = settings.GatewayOptions(
        mode=settings.GatewayMode.DIRECT,
        backends=tuple(b.address for b in backends),
        lb_policy=settings.LbPolicy.LEAST_REQUEST,
    )
    async with envoy_process.EnvoyProcess(options) as envoy, aiohttp.ClientSession() as session:
        served = set()
        for _ in range(20):
            async with session.get(envoy.url + "/") as response:
                served.add((await response.json())["pod"])
    assert served == {"alpha", "beta"}


async def test_original_dst_routes_to_the_backend_named_in_the_header(
    backends: tuple[Backend, Backend],
) -> None:
    options = settings.GatewayOptions(mode=settings.GatewayMode.ORIGINAL_DST)
    async with envoy_process.EnvoyProcess(options) as envoy, aiohttp.ClientSession() as session:
        for backend in (*backends, backends[1], backends[0]):
            headers = {HEADER: backend.address}
            async with session.post(envoy.url + "/v1/completions", headers=headers) as response:
                assert response.status == 200
                assert (await response.json())["pod"] == backend.name
        # The header reaches the backend unchanged (it is not stripped in this mode).
        assert backends[0].headers[-1][HEADER] == backends[0].address


async def test_original_dst_without_header_and_without_fallback_is_a_clear_503() -> None:
    options = settings.GatewayOptions(mode=settings.GatewayMode.ORIGINAL_DST)
    async with (
        envoy_process.EnvoyProcess(options) as envoy,
        aiohttp.ClientSession() as session,
        session.get(envoy.url + "/v1/models") as response,
    ):
        assert response.status == 503
        assert HEADER in await response.text()


async def test_original_dst_without_header_uses_the_fallback_backends(
    backends: tuple[Backend, Backend],
) -> None:
    options = settings.GatewayOptions(
        mode=settings.GatewayMode.ORIGINAL_DST, backends=(backends[1].address,)
    )
    async with envoy_process.EnvoyProcess(options) as envoy, aiohttp.ClientSession() as session:
        async with session.get(envoy.url + "/v1/models") as response:
            assert (await response.json())["pod"] == "beta"
        async with session.get(envoy.url + "/", headers={HEADER: backends[0].address}) as response:
            assert (await response.json())["pod"] == "alpha"


@pytest.mark.parametrize("mode", [settings.GatewayMode.DIRECT, settings.GatewayMode.ORIGINAL_DST])
async def test_large_body_arrives_byte_for_byte(
    backends: tuple[Backend, Backend], mode: settings.GatewayMode
) -> None:
    body = os.urandom(200 * 1024)
    target = backends[0]
    options = settings.GatewayOptions(mode=mode, backends=(target.address,))
    async with envoy_process.EnvoyProcess(options) as envoy, aiohttp.ClientSession() as session:
        headers = {HEADER: target.address}
        async with session.post(envoy.url + "/v1/completions", data=body, headers=headers) as resp:
            answer = await resp.json()
    assert answer["size"] == len(body)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    assert target.bodies[-1] == body


async def test_streamed_response_passes_through_incrementally(
    backends: tuple[Backend, Backend],
) -> None:
    target = backends[1]
    options = settings.GatewayOptions(mode=settings.GatewayMode.ORIGINAL_DST)
    async with envoy_process.EnvoyProcess(options) as envoy, aiohttp.ClientSession() as session:
        events = await read_sse_releasing_each(session, envoy.url, target, {HEADER: target.address})
    assert events == [f"data: beta {i}" for i in range(SSE_EVENTS)]


async def test_original_dst_does_not_understand_a_list_of_endpoints(
    backends: tuple[Backend, Backend],
) -> None:
    """A comma-joined fallback list in the header is not an address to ORIGINAL_DST: 503."""
    options = settings.GatewayOptions(mode=settings.GatewayMode.ORIGINAL_DST)
    listed = ",".join(b.address for b in backends)
    async with (
        envoy_process.EnvoyProcess(options) as envoy,
        aiohttp.ClientSession() as session,
        session.get(envoy.url + "/", headers={HEADER: listed}) as response,
    ):
        assert response.status == 503
        assert "no healthy upstream" in await response.text()
    assert all(b.bodies == [] for b in backends)
