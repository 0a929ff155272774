"""`sluice gateway` in front of real simulators (`sluice simulate`): requests through the
real Envoy and picker, the README's commands as written, and nothing left behind."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import socket
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from epp.datalayer import prometheus_text
from sluice.gateway import cli
from sluice.sim import child_process
from tests.support import processes, text

pytestmark = pytest.mark.envoy


async def start_gateway(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    env, marker = processes.marked_environment()
    process = await asyncio.create_subprocess_exec(
        *processes.sluice_command("gateway", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    return process, marker


async def banner(process: asyncio.subprocess.Process) -> dict[str, str]:
    """The URLs and the curl line `sluice gateway` prints once it is ready."""
    assert process.stdout is not None
    lines, _ = await processes.lines_until(process.stdout, "Try:")
    fields = dict(line.split(": ", 1) for line in lines)
    fields["curl"] = (await processes.read_line(process.stdout)).strip()
    return fields


async def stop(process: asyncio.subprocess.Process, marker: str, signum: int) -> None:
    # The gateway, Envoy: both up before the signal, both gone after it.
    assert len(processes.marked_processes(marker)) >= 2
    status, stdout, stderr = await processes.stop_and_reap(process, signum)
    assert status == 0, stderr
    assert stdout == "sluice gateway: stopped\n"
    assert not processes.marked_processes(marker)


@pytest.fixture
async def two_simulators() -> AsyncIterator[list[str]]:
    """Two `sluice simulate` processes, pods `a-0` and `b-0`."""
    async with (
        child_process.simulator_process(1, ["--pod-name-prefix", "a"]) as a,
        child_process.simulator_process(1, ["--pod-name-prefix", "b"]) as b,
    ):
        yield [*a, *b]


async def complete(
    session: aiohttp.ClientSession, url: str, prompt: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    body = orjson.dumps({"model": "sim-model", "prompt": prompt, "max_tokens": 2})
    async with session.post(f"{url}/v1/completions", data=body, headers=headers) as response:
        await response.read()
        return response


async def picker_requests(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    """inference_objective_request_total by priority."""
    async with session.get(metrics_url) as response:
        page = prometheus_text.MetricsPage(await response.text())
    totals: dict[str, float] = {}
    for sample in page.samples("inference_objective_request_total"):
        totals[sample.labels["priority"]] = totals.get(sample.labels["priority"], 0) + sample.value
    return totals


async def test_gateway_routes_to_two_simulators_and_stops_on_sigterm(two_simulators):
    process, marker = await start_gateway(
        "--endpoints", ",".join(two_simulators), "--port", "0", "--metrics-port", "0"
    )
    try:
        printed = await banner(process)
        url, metrics_url = printed["Gateway"], printed["Picker metrics"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", metrics_url)
        # The curl line names the model the servers serve, asked from them.
        assert printed["curl"].startswith(f"curl -si {url}/v1/completions ")
        assert '"model": "sim-model"' in printed["curl"]
        pods = []
        async with aiohttp.ClientSession() as session:
            for i in range(24):
                # Prompts shorter than a prefix block: no affinity, so ties spread the load.
                response = await complete(session, url, f"{i} hi")
                assert response.status == 200
                pods.append(response.headers["x-inference-pod"])
            assert await picker_requests(session, metrics_url) == {"0": 24}
        assert set(pods) == {"a-0", "b-0"}
        await stop(process, marker, signal.SIGTERM)
    finally:
        await processes.clean_up(process, marker)
    # The model servers are the user's: the gateway leaves them running.
    async with aiohttp.ClientSession() as session:
        for address in two_simulators:
            async with session.get(f"http://{address}/health") as response:
                assert response.status == 200


POOL = """\
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {{name: sims, namespace: default}}
spec:
  selector: {{matchLabels: {{app: sim}}}}
  targetPorts: [{{number: {port_a}}}, {{number: {port_b}}}]
  endpointPickerRef: {{name: sluice, port: {{number: 9002}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sims, namespace: default, labels: {{app: sim}}}}
status:
  podIP: 127.0.0.1
  conditions: [{{type: Ready, status: "True"}}]
"""


async def test_gateway_from_manifests_with_flow_control_stops_on_ctrl_c(two_simulators, tmp_path):
    port_a, port_b = (address.rsplit(":", 1)[1] for address in two_simulators)
    pool = tmp_path / "pool.yaml"
    pool.write_text(POOL.format(port_a=port_a, port_b=port_b))
    process, marker = await start_gateway(
        "--manifests", str(pool), "--flow-control", "--port", "0", "--metrics-port", "0"
    )
    try:
        printed = await banner(process)
        url, metrics_url = printed["Gateway"], printed["Picker metrics"]
        api = printed["Workload API"]
        assert api == metrics_url.replace("/metrics", "/api/v1/workload/<id>/metrics")
        headers = {
            "x-workload-context": '{"workload_id":"fraud","criticality":5}',
            "x-gateway-inference-objective": "critical",
        }
        async with aiohttp.ClientSession() as session:
            response = await complete(session, url, "Is this payment fraud?", headers)
            assert response.status == 200
            assert response.headers["x-inference-pod"] in {"a-0", "b-0"}  # the Pod's two ports
            async with session.get(api.replace("<id>", "fraud")) as answer:
                assert answer.status == 200
                assert (await answer.json())["total_requests"] == 1
            # The preset's objective put it in priority band 10.
            assert await picker_requests(session, metrics_url) == {"10": 1}
        await stop(process, marker, signal.SIGINT)
    finally:
        await processes.clean_up(process, marker)


async def test_the_readme_gateway_commands_work_as_written():
    simulate, gateway, curl = text.readme_commands("In front of model servers you already run")
    # Free ports for the README's 8000, 8001 and 8081: other tests may run beside this one.
    base = child_process.consecutive_free_ports(2)
    simulate = simulate.removesuffix("&").replace("8000", str(base))
    assert shlex.split(simulate)[:2] == [".venv/bin/sluice", "simulate"]
    sim_env, sim_marker = processes.marked_environment()
    simulators = await asyncio.create_subprocess_exec(
        *processes.sluice_command(*shlex.split(simulate)[1:]),
        stdout=asyncio.subprocess.PIPE,
        env=sim_env,
    )
    try:
        assert simulators.stdout is not None
        for _ in range(2):  # one "serving" line per server once it listens
            assert "serving 'sim-model'" in await processes.read_line(simulators.stdout)
        gateway_args = shlex.split(gateway)
        assert gateway_args[:2] == [".venv/bin/sluice", "gateway"]
        endpoints = ",".join(f"127.0.0.1:{base + i}" for i in range(2))
        assert gateway_args[2:] == ["--endpoints", "127.0.0.1:8000,127.0.0.1:8001"]
        process, marker = await start_gateway(
            "--endpoints", endpoints, "--port", "0", "--metrics-port", "0"
        )
        try:
            url = (await banner(process))["Gateway"]
            shell = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                curl.replace("http://127.0.0.1:8081", url),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(shell.communicate(), 30)
            assert out.decode().startswith("HTTP/1.1 200"), out
            await stop(process, marker, signal.SIGINT)
        finally:
            await processes.clean_up(process, marker)
        status, _, _ = await processes.stop_and_reap(simulators, signal.SIGINT)
        assert status == 0
        assert not processes.marked_processes(sim_marker)
    finally:
        await processes.clean_up(simulators, sim_marker)


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        ([], 2, "no model servers: give --endpoints ip:port,... or --manifests FILE"),
        (["--endpoints", "127.0.0.1:1", "--flow-control", "--config-file", "c.yaml"], 2,
         "--flow-control and --config-file both choose the picker's config"),
        (["--endpoints", "localhost:8000", "--port", "0", "--metrics-port", "0"], 1,
         "--endpoints: 'localhost' in 'localhost:8000' is not an IP address"),
        (["--manifests", "/nonexistent/pool.yaml", "--port", "0", "--metrics-port", "0"], 1,
         "/nonexistent/pool.yaml: cannot read: No such file or directory"),
        (["--endpoints", "127.0.0.1:1", "--host", "localhost"], 2,
         "--host 'localhost' is not an IP address"),
        (["--endpoints", "127.0.0.1:1", "--port", "65536"], 2,
         "port must be between 0 and 65535, got 65536"),
    ],
)  # fmt: skip
def test_bad_input_gets_one_line(
    args: list[str], status: int, message: str, capsys: pytest.CaptureFixture[str]
):
    try:
        code = cli.main(args)
    except SystemExit as exited:
        code = exited.code
    assert code == status
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and message in err, err


async def test_a_taken_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, _ = await start_gateway(
            "--endpoints", "127.0.0.1:1", "--port", str(port), "--metrics-port", "0"
        )
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert err.decode() == f"sluice gateway: --port {port}: 127.0.0.1:{port} is already in use\n"
