"""The picker's scheduling latency while its operator digests a burst of 1,000 pod events.

A closed-loop client (4 streams in flight) asks the embedded picker for decisions: first
with a quiet cluster (the baseline), then while a separate process creates 1,000 pods that
match the pool's selector (not Ready, so they change the operator's view but never receive
traffic). The latency of one decision is request headers + body -> the picker's answer.
Three runs, each with a fresh API server and operator:
  coalesced   the default: snapshot rebuilds coalesced, at most one per 50 ms
  per-event   `--snapshot-coalescing=false`: one rebuild per event
  unwatched   the same burst in a namespace the operator does not watch: the same load on
              the machine (API server, writer) without the operator's work, as a control

    .venv/bin/python -m bench.operator_burst --pods 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import aiohttp

from bench.harness import PYTHON, cpu_seconds, simulators
from bench.operator_cluster import NAMESPACE, ApiWriter, api_server, pod, pool
from bench.operator_process import operator, percentile, probe
from tests.support.extproc_client import ExtProcClient

HERE = Path(__file__).resolve().parent
STREAMS = 4


async def _load(client: ExtProcClient, stop: asyncio.Event) -> list[float]:
    latencies: list[float] = []

    async def stream() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await probe(client)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(stream() for _ in range(STREAMS)))
    return latencies


def _summary(latencies: list[float], cpu_s: float, wall_s: float) -> dict[str, float]:
    return {
        "requests": len(latencies),
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": max(latencies) * 1000,
        "operator_cpu_fraction": cpu_s / wall_s,
    }


async def _one_mode(pods: int, quiet_s: float, mode: str) -> dict[str, object]:
    coalesce = mode != "per-event"
    namespace = "elsewhere" if mode == "unwatched" else NAMESPACE
    async with simulators(4) as addresses, api_server() as url:
        ports = [int(a.split(":")[1]) for a in addresses]
        async with aiohttp.ClientSession() as session:
            api = ApiWriter(session, url)
            serving = pool(ports[0])
            serving["spec"]["targetPorts"] = [{"number": p} for p in ports]
            await api.create(serving)
            await api.create(pod("server", "127.0.0.1"))
        extra = [f"--snapshot-coalescing={str(coalesce).lower()}"]
        async with operator(url, extra) as (process, grpc_port):
            client = ExtProcClient(grpc_port)
            try:
                await _load(client, _after(0.5))  # warm up: connections, scrapes
                cpu0, t0 = cpu_seconds(process.pid), time.perf_counter()
                quiet = await _load(client, _after(quiet_s))
                quiet_summary = _summary(
                    quiet, cpu_seconds(process.pid) - cpu0, time.perf_counter() - t0
                )

                stop = asyncio.Event()
                cpu0, t0 = cpu_seconds(process.pid), time.perf_counter()
                load = asyncio.create_task(_load(client, stop))
                writer = await asyncio.create_subprocess_exec(
                    PYTHON, "-m", "bench.operator_cluster", "burst", url, str(pods), namespace
                )
                await writer.wait()
                written_s = time.perf_counter() - t0
                # The operator may still be catching up once the writer is done.
                await asyncio.sleep(1.0)
                stop.set()
                burst = await load
                burst_summary = _summary(
                    burst, cpu_seconds(process.pid) - cpu0, time.perf_counter() - t0
                )
            finally:
                await client.close()
    return {
        "mode": mode,
        "quiet": quiet_summary,
        "burst": burst_summary,
        "burst_write_s": written_s,
        "p99_ratio_burst_vs_quiet": burst_summary["p99_ms"] / quiet_summary["p99_ms"],
        "p50_ratio_burst_vs_quiet": burst_summary["p50_ms"] / quiet_summary["p50_ms"],
    }


def _after(seconds: float) -> asyncio.Event:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, event.set)
    return event


async def run(pods: int, quiet_s: float) -> dict[str, object]:
    return {
        "pods": pods,
        "streams": STREAMS,
        "modes": [
            await _one_mode(pods, quiet_s, mode) for mode in ("coalesced", "per-event", "unwatched")
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--quiet-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "operator_burst.json")
    args = parser.parse_args()
    results = asyncio.run(run(args.pods, args.quiet_seconds))
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
