"""`sluice demo` comes up, serves a request through Envoy and the picker, and leaves nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

pytestmark = pytest.mark.envoy


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_demo_serves_curl_and_stops_cleanly_on_ctrl_c():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sluice.cli", "demo",
        "--replicas", "2", "--gateway-port", "0", "--no-view", "--time-scale", "0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        url = ""
        while not url:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, "demo exited before printing the gateway URL"
            if line.startswith(b"Gateway: "):
                url = line.split()[1].decode()
        rest = await asyncio.wait_for(process.stdout.readline(), 10)
        assert rest.startswith(b"Picker metrics: ")
        body = orjson.dumps({"model": "sim-model", "prompt": "Say hello", "max_tokens": 4})
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/v1/completions", data=body) as response,
        ):
            assert response.status == 200
            assert response.headers["x-inference-pod"] in {"sim-0", "sim-1"}
            answer = await response.json()
        assert answer["usage"]["completion_tokens"] == 4
        children = descendants(process.pid)
        assert len(children) >= 2  # the simulators and Envoy
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    assert not [pid for pid in children if alive(pid)]
