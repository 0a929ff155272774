"""`sluice picker` as a separate process (as replicas run), and its counters read from its
own /metrics page: a test cannot look inside another process's index."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

from epp.datalayer import prometheus_text
from sluice.gateway.ports import free_tcp_port
from sluice.sim import child_process
from tests.support import processes

REQUESTS = "inference_objective_request_total"
KV_EVENTS = "inference_extension_kv_events_total"


@dataclass(frozen=True, slots=True)
class PickerProcess:
    process: asyncio.subprocess.Process
    grpc_port: int
    metrics_url: str

    async def counter(self, session: aiohttp.ClientSession, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
        async with session.get(self.metrics_url) as response:
            page = prometheus_text.MetricsPage(await response.text())
        return sum(
            s.value
            for s in page.samples(name)
            if all(s.labels.get(k) == v for k, v in labels.items())
        )


@contextlib.asynccontextmanager
async def picker_process(
    endpoints: Sequence[str],
    config_file: Path | None,
    *extra: str,
    startup_timeout_s: float = 30.0,
) -> AsyncIterator[PickerProcess]:
    """`sluice picker` on static `endpoints` with `config_file` (None: the default profile),
    once its /metrics answers."""
    grpc_port, health_port, metrics_port = (free_tcp_port() for _ in range(3))
    # A file, not a pipe: nobody reads a pipe while the picker runs, and a full one blocks it.
    log = tempfile.TemporaryFile()  # noqa: SIM115  # closed after the process ends
    process = await asyncio.create_subprocess_exec(
        *processes.sluice_command(
            "picker",
            "--endpoints", ",".join(endpoints),
            *(["--config-file", str(config_file)] if config_file is not None else []),
            "--host", "127.0.0.1",
            "--grpc-port", str(grpc_port),
            "--grpc-health-port", str(health_port),
            "--metrics-port", str(metrics_port),
            "--secure-serving=false",
            *extra,
        ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )  # fmt: skip
    picker = PickerProcess(process, grpc_port, f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        await _until_serving(picker, startup_timeout_s, log)
        yield picker
    finally:
        await child_process.terminate(process)
        log.close()


async def _until_serving(picker: PickerProcess, timeout_s: float, log: IO[bytes]) -> None:
    """Poll /metrics (a process signals nothing else) until it answers."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if picker.process.returncode is not None:
                log.seek(0)
                raise RuntimeError(f"sluice picker exited: {log.read().decode()[-800:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(picker.metrics_url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError("sluice picker did not serve /metrics in time")
            await asyncio.sleep(0.05)
