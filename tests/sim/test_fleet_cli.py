"""Many servers in one process: the Python API and `sluice simulate` as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sluice.sim import cli, config, fleet
from tests.sim import support


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def free_port_run(length: int) -> int:
    """A port p such that p .. p+length-1 were free a moment ago."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + length > 65535:
            continue
        try:
            socks = []
            for port in range(base, base + length):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports")


async def test_fleet_on_free_ports_has_distinct_pods(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(3, pod_name_prefix="pod") as servers:
        assert len(set(servers.addresses)) == 3
        pods = []
        for url in servers.urls:
            _, _, headers = await support.complete(
                session, url, {"model": "sim-model", "prompt": "hi", "max_tokens": 1}
            )
            pods.append(headers["x-inference-pod"])
            assert headers["x-inference-port"] == url.rsplit(":", 1)[1]
        assert servers.by_pod("pod-2") is servers[2]
    assert pods == ["pod-0", "pod-1", "pod-2"]


async def test_fleet_with_own_configs_and_consecutive_ports(
    session: aiohttp.ClientSession,
) -> None:
    base = free_port_run(2)
    configs = [config.SimConfig(model="a"), config.SimConfig(model="b", lora_modules=("x",))]
    async with fleet.run_fleet(configs, base_port=base) as servers:
        assert [s.port for s in servers] == [base, base + 1]
        for server, expected in zip(servers, (["a"], ["b", "x"]), strict=True):
            async with session.get(f"{server.url}/v1/models") as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == expected


async def test_fleet_rejects_bad_config_and_busy_port() -> None:
    with pytest.raises(ValueError, match="--max-num-seqs"):
        async with fleet.run_fleet(
            1,
            config=config.SimConfig().replace(
                performance=config.engine.PerformanceModel(max_num_seqs=0)
            ),
        ):
            pass
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            async with fleet.run_fleet(1, base_port=busy.getsockname()[1]):
                pass


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--time-scale", "0"], "--time-scale must be > 0"),
        (["--max-model-len", "999999", "--kv-cache-size", "10"], "--max-model-len 999999"),
        (["--enable-prefix-caching=maybe"], "expected true or false"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_flags_build_the_config() -> None:
    args = cli.build_parser().parse_args(
        [
            "--lora-modules",
            "a=/p/a",
            "b,c",
            '{"name": "d", "path": "/p/d"}',
            "--time-to-first-token",
            "1.5s",
            "--inter-token-latency",
            "7",
            "--enable-prefix-caching=false",
            "--slow-start",
            "500ms",
        ]
    )
    cfg = cli.config_from_args(args)
    assert cfg.lora_modules == ("a", "b", "c", "d")
    assert cfg.performance.ttft_ms == 1500.0 and cfg.performance.itl_ms == 7.0
    assert cfg.performance.enable_prefix_caching is False
    assert cfg.slow_start_s == 0.5


def test_replica_speeds_make_a_heterogeneous_pool() -> None:
    args = cli.build_parser().parse_args(
        ["--replicas", "4", "--replica-speeds", "1,0.5", "--time-to-first-token", "20"]
    )
    configs = cli.replica_configs(cli.config_from_args(args), 4, args.replica_speeds)
    assert [c.performance.ttft_ms for c in configs] == [20.0, 40.0, 20.0, 40.0]
    assert configs[1].performance.itl_ms == 2 * configs[0].performance.itl_ms
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--replica-speeds", "1,0"])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for CPU time")
async def test_cli_replicas_serve_idle_cheaply_and_stop_on_sigterm(
    session: aiohttp.ClientSession,
) -> None:
    replicas = 8
    base = free_port_run(replicas)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sluice.cli",
        "simulate",
        "--replicas",
        str(replicas),
        "--port",
        str(base),
        "--pod-name-prefix",
        "cli",
        "--time-scale",
        "0.01",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        for _ in range(replicas):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=20)
            assert b"serving 'sim-model'" in line, line
        pods = set()
        for i in range(replicas):
            _, _, headers = await support.complete(
                session,
                f"http://127.0.0.1:{base + i}",
                {"model": "sim-model", "prompt": "hi", "max_tokens": 2},
            )
            pods.add(headers["x-inference-pod"])
        assert pods == {f"cli-{i}" for i in range(replicas)}
        before, start = _cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(1.0)  # measuring idle CPU needs wall time to pass
        idle_cpu = (_cpu_seconds(proc.pid) - before) / (time.monotonic() - start)
        assert idle_cpu < 0.05, f"idle CPU {idle_cpu:.1%} with {replicas} replicas"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=10)
    assert proc.returncode == 0, err


def test_background_fleet_serves_synchronous_callers() -> None:
    import urllib.request

    with fleet.BackgroundFleet(2, config=config.SimConfig(time_scale=0.01)) as bg:
        request = urllib.request.Request(
            f"{bg.urls[1]}/v1/completions",
            method="POST",
            data=b'{"model": "sim-model", "prompt": "hi", "max_tokens": 3}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.headers["x-inference-pod"] == "sim-1"
            assert b'"completion_tokens":3' in resp.read()
        bg.call(bg.fleet[0].set_silent, True)
        assert bg.call(lambda: bg.fleet[0].silent) is True
    with pytest.raises(RuntimeError):
        _ = bg.addresses
    with pytest.raises(OSError), socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fleet.BackgroundFleet(1, base_port=busy.getsockname()[1]).start()
