"""EnvoyProcess: start, readiness, port discovery, failure reporting and clean shutdown."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import aiohttp
import pytest

from sluice.gateway import envoy_config, envoy_process, ports, settings
from sluice.gateway.settings import GatewayMode

HEADER = settings.DESTINATION_HEADER


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); count it as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.mark.envoy
async def test_start_reports_ports_and_stop_leaves_nothing_behind() -> None:
    envoy = envoy_process.EnvoyProcess(settings.GatewayOptions(mode=GatewayMode.ORIGINAL_DST))
    async with envoy:
        pid = envoy.pid
        assert pid is not None and _alive(pid)
        assert envoy.port > 0 and envoy.admin_port > 0 and envoy.port != envoy.admin_port
        assert envoy.url == f"http://127.0.0.1:{envoy.port}"
        workdir = envoy.log_path.parent if envoy.log_path else None
        async with aiohttp.ClientSession() as session:
            async with session.get(envoy.admin_url + "/ready") as response:
                assert (await response.text()).strip() == "LIVE"
            async with session.get(envoy.url + "/") as response:
                assert response.status == 503  # no header, no fallback: Envoy itself answered
    assert not _alive(pid)
    assert workdir is not None and not workdir.exists()
    await envoy.stop()  # idempotent


@pytest.mark.envoy
async def test_several_envoys_run_side_by_side() -> None:
    options = settings.GatewayOptions(mode=GatewayMode.ORIGINAL_DST)
    async with (
        envoy_process.EnvoyProcess(options) as first,
        envoy_process.EnvoyProcess(options, concurrency=2) as second,
    ):
        assert first.port != second.port
        assert first.pid != second.pid


@pytest.mark.envoy
async def test_fixed_listener_port_is_honoured() -> None:
    port = ports.free_tcp_port()
    options = settings.GatewayOptions(mode=GatewayMode.ORIGINAL_DST, listen_port=port)
    async with envoy_process.EnvoyProcess(options) as envoy:
        assert envoy.port == port


@pytest.mark.envoy
async def test_envoy_that_dies_at_start_raises_with_its_log() -> None:
    bootstrap = envoy_config.render_bootstrap(
        settings.GatewayOptions(mode=GatewayMode.ORIGINAL_DST)
    )
    bootstrap["static_resources"]["clusters"][0]["lb_policy"] = "NO_SUCH_POLICY"
    envoy = envoy_process.EnvoyProcess(bootstrap)
    with pytest.raises(envoy_process.EnvoyError, match="NO_SUCH_POLICY"):
        await envoy.start()
    assert envoy.pid is None


@pytest.mark.envoy
async def test_listener_port_already_taken_is_reported() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        options = settings.GatewayOptions(mode=GatewayMode.ORIGINAL_DST, listen_port=taken)
        with pytest.raises(envoy_process.EnvoyError, match=r"Address already in use|exited"):
            await envoy_process.EnvoyProcess(options, startup_timeout_s=10).start()


@pytest.mark.envoy
async def test_cancelled_start_kills_envoy() -> None:
    envoy = envoy_process.EnvoyProcess(settings.GatewayOptions(mode=GatewayMode.ORIGINAL_DST))
    task = asyncio.create_task(envoy.start())
    for _ in range(5000):  # until the child exists, then cancel while it is starting
        if envoy.pid is not None:
            break
        await asyncio.sleep(0.001)
    pid = envoy.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _alive(pid)


@pytest.mark.envoy
async def test_stats_reads_counters() -> None:
    async with envoy_process.EnvoyProcess(
        settings.GatewayOptions(mode=GatewayMode.ORIGINAL_DST)
    ) as e:
        async with aiohttp.ClientSession() as session, session.get(e.url + "/") as response:
            await response.read()
        stats = await e.stats(r"http\.gateway\.downstream_rq_total")
    assert stats["http.gateway.downstream_rq_total"] == 1


def test_binary_override_must_be_executable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(envoy_process.ENVOY_BIN_ENV, "/nonexistent/envoy")
    with pytest.raises(envoy_process.EnvoyError, match="SLUICE_ENVOY_BIN"):
        envoy_process.find_envoy_binary()


def test_binary_override_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "envoy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(envoy_process.ENVOY_BIN_ENV, str(fake))
    assert envoy_process.find_envoy_binary() == str(fake)


def test_launcher_script_is_replaced_by_the_real_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(envoy_process.ENVOY_BIN_ENV, raising=False)
    try:
        found = envoy_process.find_envoy_binary()
    except envoy_process.EnvoyError:
        pytest.skip("no Envoy installed")
    with open(found, "rb") as handle:
        assert not handle.read(2).startswith(b"#!"), f"{found} is a script, not Envoy"


def test_bootstrap_without_admin_is_rejected() -> None:
    with pytest.raises(ValueError, match="admin"):
        envoy_process.EnvoyProcess({"static_resources": {}})


def test_free_tcp_port_is_bindable() -> None:
    port = ports.free_tcp_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
