"""Pieces the operator benchmarks run as child processes, so each has its own interpreter.

    python -m bench.operator_cluster serve           # emulated API server; prints its URL
    python -m bench.operator_cluster burst URL N NS  # N pod writes in namespace NS, fast

The emulated API server is the one the operator tests use (kmock plus the fixes in
tests/operator/cluster.py). Burst pods match the pool's selector but are not Ready, so every
event reaches the reconciler while no picker ever sends traffic to their (fake) addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from bench.harness import PYTHON
from tests.operator.cluster import Cluster, emulated_cluster
from tests.operator.harness import NAMESPACE, POOL, pod, pool

__all__ = ["NAMESPACE", "POOL", "ApiWriter", "api_server", "pod", "pool"]


class ApiWriter:
    """Test-style writes to the emulated API server over HTTP, from another process."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self._session = session
        self._url = url

    async def create(self, obj: dict[str, Any]) -> None:
        path = Cluster._path(obj["kind"], obj["metadata"].setdefault("namespace", NAMESPACE))
        async with self._session.post(self._url + path, json=obj) as response:
            assert response.status < 300, await response.text()

    async def patch(self, kind: str, name: str, change: dict[str, Any]) -> None:
        path = Cluster._path(kind, NAMESPACE, name)
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self._session.patch(self._url + path, json=change, headers=headers) as r:
            assert r.status < 300, await r.text()


@contextlib.asynccontextmanager
async def api_server() -> AsyncIterator[str]:
    """The emulated API server in a child process; yields its URL."""
    process = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.operator_cluster", "serve", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        url = (await process.stdout.readline()).decode().strip()
        if not url:
            raise RuntimeError("the emulated API server did not start")
        yield url
    finally:
        process.terminate()
        await process.wait()


async def _serve() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with emulated_cluster(request_log_limit=2) as cluster:
        print(cluster.gate.url, flush=True)
        await stop.wait()


async def _burst(url: str, count: int, namespace: str) -> None:
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:
        writer = ApiWriter(session, url)

        async def one(i: int) -> None:
            # 10.255.x.y never receives traffic: the pod is not Ready.
            obj = pod(f"burst-{i}", f"10.255.{i // 250}.{i % 250 + 1}", ready=False)
            obj["metadata"]["namespace"] = namespace
            await writer.create(obj)

        await asyncio.gather(*(one(i) for i in range(count)))


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve())
    elif sys.argv[1:2] == ["burst"]:
        asyncio.run(_burst(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    else:
        raise SystemExit("usage: python -m bench.operator_cluster serve | burst URL N NS")


if __name__ == "__main__":
    main()
