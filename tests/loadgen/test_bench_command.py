"""`sluice bench` as a user runs it: a real process against a real simulator or a dead port."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

from sluice.gateway.ports import free_tcp_port
from sluice.loadgen import cli
from sluice.sim import config as sim_config
from sluice.sim.fleet import run_fleet

FAST = sim_config.SimConfig(time_scale=0.05)
SMALL = ("--groups", "2", "--prefix-tokens", "32", "--question-tokens", "4", "--max-tokens", "3")


async def bench(*args: str, python: tuple[str, ...] = ("-m", "sluice.cli")) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *python, "bench", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_a_dead_url_fails_with_the_reason():
    port = free_tcp_port()  # nothing listens on it
    code, stdout, stderr = await bench(
        "--url", f"http://127.0.0.1:{port}", "--requests", "3", "--concurrency", "1"
    )
    assert code == 1
    lines = stderr.splitlines()
    assert lines[-1] == (
        f"sluice bench: 3 of 3 requests failed: connection refused to http://127.0.0.1:{port}/ (3)"
    )
    assert lines[-2].startswith("sent 3/3, completed 0, failed 3, ")  # the progress line
    assert "| shared-prefix | 0/3 |" in stdout
    assert "nan" not in stdout


async def test_a_mixed_run_is_recorded_broken_down_and_plotted(tmp_path: Path):
    out, png = tmp_path / "run.jsonl", tmp_path / "run.png"
    async with run_fleet(1, config=FAST) as fleet:
        code, stdout, stderr = await bench(
            "--url", fleet.urls[0], "--requests", "40", "--concurrency", "4", *SMALL,
            "--criticality-mix", "1:0.5,5:0.5", "--slo-ttft-ms", "60000", "--slo-fraction",
            "0.5", "--out", str(out), "--plot", str(png), "--pods", "sim-0,sim-idle",
        )  # fmt: skip
    assert code == 0, stderr
    assert "failed" not in stderr.replace("failed 0", "")
    assert stderr.splitlines()[-1].startswith("sent 40/40, completed 40, failed 0, ")

    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert {r["criticality"] for r in records} == {1, 5}
    with_slo = [r for r in records if r["slo_ttft_ms"] is not None]
    assert 0 < len(with_slo) < 40 and {r["slo_ttft_ms"] for r in with_slo} == {60000}

    def row(*cells: str) -> str:
        (line,) = [line for line in stdout.splitlines() if line.startswith(" | ".join(cells))]
        return line

    assert "| run | criticality | ok/total | TTFT p50 ms | TTFT p90 ms | SLO met |" in stdout
    for level in (1, 5):
        n = sum(r["criticality"] == level for r in records)
        assert row("| shared-prefix", str(level), f"{n}/{n}")
    assert "| run | SLO | ok/total | TTFT p50 ms | TTFT p90 ms | SLO met |" in stdout
    met = row("| shared-prefix", "TTFT 60000 ms", f"{len(with_slo)}/{len(with_slo)}")
    assert met.endswith("| 100% |")  # every request with the 60 s objective met it
    no_slo = 40 - len(with_slo)
    assert row("| shared-prefix", "no SLO", f"{no_slo}/{no_slo}").endswith("| - |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_missing_matplotlib_fails_before_any_request(tmp_path: Path):
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as when it
    # is not installed.
    without_matplotlib = (
        "-c",
        "import sys; sys.modules['matplotlib'] = None; from sluice.cli import main; "
        "sys.exit(main(sys.argv[1:]))",
    )
    async with server:
        code, stdout, stderr = await bench(
            "--url", f"http://127.0.0.1:{port}", "--requests", "5", "--plot",
            str(tmp_path / "p.png"), python=without_matplotlib,
        )  # fmt: skip
    assert code == 2
    assert stderr.splitlines() == [
        "sluice bench: --plot: matplotlib is not installed in this environment; install it "
        "with scripts/setup bench (or scripts/setup test) from the repository root"
    ]
    assert stdout == "" and connections == 0


def test_help_shows_every_default():
    parser = cli.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "(default: " in action.help, action.option_strings
    text = parser.format_help()
    assert "(default: 200)" in text and "(default: shared-prefix)" in text
