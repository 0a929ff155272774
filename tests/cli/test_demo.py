"""`sluice demo` as a user runs it: on a terminal, under a pipe, with the README's commands.

Every test runs the real command (simulators, picker, Envoy) and stops it as a user
would; none leaves a process behind. The overload scenario runs on a small pool at a
quarter of real time, so priority shows within seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import signal
import socket
import time

import aiohttp
import orjson
import pytest

from sluice import demo as demo_command
from sluice.gateway import ports
from tests.support import processes, text

pytestmark = pytest.mark.envoy

SMALL_OVERLOAD = [
    "--scenario", "overload", "--replicas", "2", "--max-num-seqs", "2",
    "--time-scale", "0.25", "--gateway-port", "0",
]  # fmt: skip
BAND_ROW = re.compile(r"^\s*(-?\d+) (\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$")
WORKLOAD_ROW = re.compile(r"^(critical|standard|sheddable)\s+\S+\s+\d\s+[\d.]+((?:\s+\d+){5})")


def demo(*args: str) -> list[str]:
    return processes.sluice_command("demo", *args)


async def start_piped(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    """The demo with its output on pipes, and the marker its processes carry."""
    env, marker = processes.marked_environment()
    process = await asyncio.create_subprocess_exec(
        *demo(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    return process, marker


def assert_all_running(marker: str) -> None:
    # The demo, its simulators' process and Envoy: what must all be gone after Ctrl-C.
    assert len(processes.marked_processes(marker)) >= 3


async def assert_stops_cleanly(process: asyncio.subprocess.Process, marker: str) -> None:
    piped = process.stdout is not None
    status, stdout, stderr = await processes.stop_and_reap(process, signal.SIGINT)
    assert status == 0, stderr
    assert stdout.endswith("sluice demo: stopped\n") or not piped
    assert not processes.marked_processes(marker)


async def test_demo_serves_curl_and_stops_cleanly_on_ctrl_c():
    process, marker = await start_piped(
        "--replicas", "2", "--gateway-port", "0", "--no-view", "--time-scale", "0.1"
    )
    assert process.stdout is not None
    try:
        _, line = await processes.lines_until(process.stdout, "Gateway: ")
        url = line.split()[1]
        rest = await processes.read_line(process.stdout)
        assert rest.startswith("Picker metrics: ")
        body = orjson.dumps({"model": "sim-model", "prompt": "Say hello", "max_tokens": 4})
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/v1/completions", data=body) as response,
        ):
            assert response.status == 200
            assert response.headers["x-inference-pod"] in {"sim-0", "sim-1"}
            answer = await response.json()
        assert answer["usage"]["completion_tokens"] == 4
        assert_all_running(marker)
        await assert_stops_cleanly(process, marker)
    finally:
        await processes.clean_up(process, marker)


def band_rows(frame: str) -> dict[int, tuple[int, ...]]:
    """priority -> (requests, queued, admitted, 429, 503) from the view's band table."""
    rows = {}
    for line in frame.splitlines():
        match = BAND_ROW.match(line)
        if match:
            rows[int(match[1])] = tuple(int(match[i]) for i in range(3, 8))
    return rows


def workload_rows(frame: str) -> dict[str, tuple[int, ...]]:
    """workload -> (sent, 200, 429, 503, other) as its clients saw them."""
    rows = {}
    for line in frame.splitlines():
        match = WORKLOAD_ROW.match(line)
        if match:
            rows[match[1]] = tuple(int(n) for n in match[2].split())
    return rows


def priority_at_work(frame: str) -> bool:
    bands, workloads = band_rows(frame), workload_rows(frame)
    if set(workloads) != {"critical", "standard", "sheddable"} or 0 not in bands:
        return False
    return (
        workloads["critical"][1] > 0  # critical requests answered 200
        and workloads["sheddable"][2] > 0  # sheddable ones 429
        and bands[0][1] > 0  # standard ones waiting in the picker
    )


async def test_overload_view_on_a_terminal_keeps_the_urls_and_shows_priority_at_work():
    metrics_port = ports.free_tcp_port()
    command = demo(
        *SMALL_OVERLOAD, "--metrics-port", str(metrics_port), "--refresh-interval", "0.2s"
    )
    async with processes.in_terminal(command) as (process, terminal, marker):
        await terminal.wait_for(lambda: "Try:" in terminal.text, 60)
        gateway_url = re.search(r"Gateway: (http://\S+)", terminal.text)[1]  # type: ignore[index]
        metrics_url = f"http://127.0.0.1:{metrics_port}"
        await terminal.wait_for(lambda: priority_at_work(terminal.last_frame()), 60)
        await terminal.wait_for(lambda: len(terminal.frames()) >= 3, 10)
        assert_all_running(marker)
        frames = terminal.frames()
        for frame in frames:  # every redraw, not only the first screen
            head = frame.splitlines()[:6]
            assert f"  Gateway:         {gateway_url}" in head
            assert f"  Picker metrics:  {metrics_url}/metrics" in head
            assert f"  Workload API:    {metrics_url}/api/v1/workload/<id>/metrics" in head
        first, last = band_rows(frames[0]), band_rows(frames[-1])
        # The numbers move: the picker admitted more requests since the first frame.
        assert sum(r[2] for r in last.values()) > sum(r[2] for r in first.values())
        assert last[10][3] == 0 and workload_rows(frames[-1])["critical"][2] == 0  # no 429
        assert "objective" in frames[-1] and "sheddable" in frames[-1]
        await assert_stops_cleanly(process, marker)
        await terminal.wait_for(lambda: terminal.text.endswith("sluice demo: stopped\n"), 10)


def status_fields(line: str) -> dict[str, str]:
    assert line.startswith("status "), line
    return dict(part.split("=", 1) for part in line.split()[1:])


async def test_overload_under_a_pipe_prints_urls_then_status_lines():
    process, marker = await start_piped(*SMALL_OVERLOAD, "--refresh-interval", "0.2s")
    assert process.stdout is not None
    try:
        banner, first_status = await processes.lines_until(process.stdout, "status ")
        assert banner[0].startswith("Gateway: http://127.0.0.1:")
        metrics_url = banner[1].removeprefix("Picker metrics: ").removesuffix("/metrics")
        assert banner[2] == f"Workload API: {metrics_url}/api/v1/workload/<id>/metrics"
        assert banner[3] == "Try:" and banner[4].lstrip().startswith("curl -si ")
        fields = status_fields(first_status)
        deadline = time.monotonic() + 60
        while not (
            int(fields.get("429", 0)) > 0
            and int(fields.get("queued[0]", 0)) > 0
            and fields["critical"].split(",")[1] != "200:0"
        ):
            assert time.monotonic() < deadline, f"no priority at work by now: {fields}"
            fields = status_fields(await processes.read_line(process.stdout))
        assert fields["critical"].split(",")[2] == "429:0"
        assert float(fields["saturation"]) > 0
        async with aiohttp.ClientSession() as session:
            for workload in ("critical", "standard", "sheddable"):
                url = f"{metrics_url}/api/v1/workload/{workload}/metrics"
                async with session.get(url) as response:
                    assert response.status == 200
                    figures = await response.json()
                assert figures["workload_id"] == workload and figures["total_requests"] > 0
        assert_all_running(marker)
        await assert_stops_cleanly(process, marker)
    finally:
        await processes.clean_up(process, marker)


async def test_the_readme_flow_control_example_works_as_written():
    start, curl_completion, curl_workload = text.readme_commands(
        "Flow control: who goes first when the pool is full"
    )
    # Free ports instead of the README's 8081 and 9090: other tests may run beside this one.
    args = shlex.split(start)
    assert args[0] == "scripts/demo" and args[1:] == ["--flow-control", "--metrics-port", "9090"]
    metrics_port = ports.free_tcp_port()
    process, marker = await start_piped(
        "--flow-control", "--metrics-port", str(metrics_port), "--gateway-port", "0", "--no-view"
    )
    assert process.stdout is not None
    try:
        _, line = await processes.lines_until(process.stdout, "Gateway: ")
        gateway = line.split("//")[1]

        async def run(command: str) -> str:
            command = command.replace("127.0.0.1:8081", gateway)
            command = command.replace("127.0.0.1:9090", f"127.0.0.1:{metrics_port}")
            shell = await asyncio.create_subprocess_exec(
                "bash", "-c", command, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(shell.communicate(), 30)
            assert shell.returncode == 0, command
            return out.decode()

        answer = await run(curl_completion)
        assert answer.startswith("HTTP/1.1 200"), answer
        assert re.search(r"^x-inference-pod: sim-\d\r?$", answer, flags=re.M)
        figures = json.loads(await run(curl_workload))
        assert figures["workload_id"] == "fraud"
        assert figures["total_requests"] == 1 and figures["active_requests"] == 0
        assert_all_running(marker)
        await assert_stops_cleanly(process, marker)
    finally:
        await processes.clean_up(process, marker)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flow-control", "--config-file", "x.yaml"], "drop --config-file"),
        (["--scenario", "overload", "--config-file", "x.yaml"], "drop --config-file"),
        (["--scenario", "surge"], "invalid choice: 'surge'"),
        (["--metrics-port", "70000"], "port must be between 0 and 65535"),
        (["--refresh-interval", "0s"], "--refresh-interval must be positive"),
        (["--replica-speeds", "1,fast"], "expected speeds like 1,0.5"),
    ],
)
def test_bad_flags_get_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exited:
        demo_command.main(args)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and message in err, err


async def test_a_taken_metrics_port_is_one_line_and_leaves_nothing():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, marker = await start_piped(
            "--replicas", "1", "--gateway-port", "0", "--metrics-port", str(port), "--no-view"
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    expected = f"sluice demo: --metrics-port {port}: 127.0.0.1:{port} is already in use\n"
    assert err.decode() == expected
    assert not processes.marked_processes(marker)
