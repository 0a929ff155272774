"""How soon a pod that turns Ready receives its first request, through the operator.

Each round: the pod's Ready condition goes False, the picker stops choosing it; then the
bench flips it to True (t0) and probes the picker back to back until a request is routed
to the pod. The same watch event is also received by a bare watch client in this process
(the API floor: what any watcher would see), so the figure that matters is the ratio

    ready -> first routed request   /   ready -> watch event delivered

measured in the same rounds. Everything runs in its own process: the emulated API server,
`sluice operator` (kopf + embedded picker), one simulated model server.

    .venv/bin/python -m bench.operator_ready_latency --rounds 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import simulators
from bench.operator_cluster import NAMESPACE, ApiWriter, api_server, pod, pool
from bench.operator_process import operator, percentile, probe
from tests.support.extproc_client import ExtProcClient

HERE = Path(__file__).resolve().parent


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def _watch_ready(session: aiohttp.ClientSession, url: str, seen: asyncio.Queue) -> None:
    """A bare watch on pods: puts (time, ready) for every event about pod x."""
    path = f"{url}/api/v1/namespaces/{NAMESPACE}/pods?watch=true"
    async with session.get(path, timeout=aiohttp.ClientTimeout(total=None)) as response:
        async for line in response.content:
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("object", {}).get("metadata", {}).get("name") == "x":
                seen.put_nowait((time.perf_counter(), _ready(event["object"])))


async def run(rounds: int) -> dict[str, object]:
    to_route: list[float] = []
    to_watch: list[float] = []
    probes: list[int] = []
    async with simulators(1) as addresses, api_server() as url:
        port = int(addresses[0].split(":")[1])
        async with aiohttp.ClientSession() as session:
            api = ApiWriter(session, url)
            await api.create(pool(port))
            await api.create(pod("x", "127.0.0.1", ready=False))
            async with operator(url) as (_, grpc_port):
                client = ExtProcClient(grpc_port)
                seen: asyncio.Queue[tuple[float, bool]] = asyncio.Queue()
                watcher = asyncio.create_task(_watch_ready(session, url, seen))
                target = addresses[0]
                try:
                    for _ in range(rounds):
                        await api.patch("Pod", "x", {"status": {"conditions": [
                            {"type": "Ready", "status": "False"}]}})  # fmt: skip
                        while await probe(client) == target:
                            pass  # each probe is a full request: no busy spin
                        while not seen.empty():
                            seen.get_nowait()
                        # A quiet spell first, as in life: a change right after another
                        # waits out the feed's minimum rebuild interval (50 ms).
                        await asyncio.sleep(0.1)
                        t0 = time.perf_counter()

                        async def first_routed(t0: float) -> tuple[float, int]:
                            count = 1
                            while await probe(client) != target:
                                count += 1
                            return time.perf_counter() - t0, count

                        # Probing starts with the write, so the figure does not include
                        # the write's own round trip.
                        routed = asyncio.create_task(first_routed(t0))
                        await api.patch("Pod", "x", {"status": {"conditions": [
                            {"type": "Ready", "status": "True"}]}})  # fmt: skip
                        elapsed, count = await routed
                        to_route.append(elapsed)
                        probes.append(count)
                        while True:
                            at, ready = await seen.get()
                            if ready:
                                to_watch.append(at - t0)
                                break
                finally:
                    watcher.cancel()
                    await client.close()

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "p50_ms": percentile(values, 0.5) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "max_ms": max(values) * 1000,
        }

    route, watch = summary(to_route), summary(to_watch)
    return {
        "rounds": rounds,
        "ready_to_first_routed": route,
        "ready_to_watch_event": watch,
        "ratio_p50": route["p50_ms"] / watch["p50_ms"],
        "ratio_p99": route["p99_ms"] / watch["p99_ms"],
        "probes_per_round_p50": percentile([float(p) for p in probes], 0.5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--out", type=Path, default=HERE / "results" / "operator_ready_latency.json"
    )
    args = parser.parse_args()
    results = asyncio.run(run(args.rounds))
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
