"""Data-layer CPU: what keeping N endpoints fresh at the default 50 ms interval costs.

The collector (one loop per endpoint, `metrics-data-source` -> `core-metrics-extractor`)
scrapes N model-server stand-ins that serve a realistic vLLM page (~300 lines, with
histograms) from a child process, so only the collector's CPU is counted. Two HTTP
clients, same run, same servers, same extractor:

  aiohttp   the previous `metrics-data-source`: one aiohttp.ClientSession GET per scrape
            (the baseline)
  lean      the current source: epp.datalayer.http_client, a keep-alive HTTP/1.1
            client on an asyncio.Protocol

Reports scrapes/s achieved, collector CPU (% of one core), CPU per scrape and CPU per
endpoint per second of wall time, plus the extractor alone (no HTTP) for scale.

    /tmp/venv/bin/python -m bench.datalayer_cost --endpoints 100 --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import time
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from epp.datalayer import collector as collecting
from epp.datalayer import extractors, interfaces, prometheus_text, sources
from epp.datalayer.endpoint_metrics import NEVER_SCRAPED, MetricsStore
from epp.datastore.snapshot import Endpoint, EndpointKey
from tests.datalayer import pages

RESULTS = Path(__file__).resolve().parent / "results" / "datalayer_cost.json"


class AiohttpMetricsSource:
    """The previous implementation's fetch path, kept here as the baseline."""

    type_name = "metrics-data-source"
    name = "aiohttp-baseline"
    output_type = prometheus_text.MetricsPage

    def __init__(self) -> None:
        self.extractors: list[interfaces.Extractor] = []
        self._session: aiohttp.ClientSession | None = None

    def add_extractor(self, extractor: interfaces.Extractor) -> None:
        interfaces.check_wiring(self, extractor)
        self.extractors.append(extractor)

    async def fetch(self, endpoint: Endpoint) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0)
            )
        url = f"http://{endpoint.target}/metrics"
        headers = {"Accept": "text/plain; version=0.0.4"}
        async with self._session.get(url, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                raise interfaces.FetchError(f"HTTP {response.status}")
            body = await response.read()
        return prometheus_text.MetricsPage(body.decode("utf-8", "replace"))

    def forget(self, endpoint: Endpoint) -> None:
        pass

    def close(self) -> None:
        if self._session is not None:
            asyncio.get_running_loop().create_task(self._session.close())
            self._session = None


def _serve(port_queue: multiprocessing.Queue[int], count: int, page: bytes) -> None:
    """Lean keep-alive servers, so that the server side costs the collector no core."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
        + f"Content-Length: {len(page)}\r\n\r\n".encode()
        + page
    )

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                self.transport.write(answer)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            server = await loop.create_server(Server, "127.0.0.1", 0)
            port_queue.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ticks(collector: collecting.Collector, endpoints: Sequence[Endpoint]) -> int:
    statuses = [collector.status(endpoint.key) for endpoint in endpoints]
    return sum(s.ticks - s.failures for s in statuses if s is not None)


async def _measure(
    source: interfaces.DataSource, endpoints: list[Endpoint], interval_s: float, seconds: float
) -> dict[str, float]:
    source.add_extractor(extractors.CoreMetricsExtractor())
    collector = collecting.Collector(MetricsStore(), [source], interval_s=interval_s)
    await collector.start()
    collector.update_endpoints(endpoints)
    await asyncio.sleep(1.0)  # warm up: connections open, parsed-line cache filled
    ticks, cpu, wall = _ticks(collector, endpoints), _cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    ticks = _ticks(collector, endpoints) - ticks
    cpu, wall = _cpu() - cpu, time.monotonic() - wall
    await collector.stop()
    await asyncio.sleep(0.1)
    return {
        "scrapes_per_s": ticks / wall,
        "target_scrapes_per_s": len(endpoints) / interval_s,
        "core_percent": cpu / wall * 100,
        "cpu_us_per_scrape": cpu / ticks * 1e6,
        "cpu_us_per_endpoint_second": cpu / wall / len(endpoints) * 1e6,
    }


def _extract_only(page: str) -> float:
    endpoint = Endpoint(EndpointKey("ns/p-rank-0"), "p", "ns", "127.0.0.1", 8000)
    extractor = extractors.CoreMetricsExtractor()

    def run() -> None:
        extractor.extract(prometheus_text.MetricsPage(page), endpoint, NEVER_SCRAPED)

    number = 2000
    return min(timeit.repeat(run, number=number, repeat=5)) / number * 1e6


def _median(rounds: list[dict[str, float]]) -> dict[str, float]:
    by_cpu = sorted(rounds, key=lambda r: r["cpu_us_per_scrape"])
    return by_cpu[len(by_cpu) // 2]


async def run(count: int, seconds: float, interval_s: float, rounds: int) -> dict[str, Any]:
    page = pages.vllm_page(waiting=3, running=7, kv_usage=0.4)
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    child = multiprocessing.Process(target=_serve, args=(ports, count, page.encode()), daemon=True)
    child.start()
    try:
        port_numbers = [ports.get(timeout=10) for _ in range(count)]
        endpoints = [
            Endpoint(EndpointKey(f"ns/p{i}-rank-0"), f"p{i}", "ns", "127.0.0.1", port)
            for i, port in enumerate(port_numbers)
        ]
        # Interleaved rounds, median per client: other work on the machine shifts single
        # runs by a few percent.
        rounds_a: list[dict[str, float]] = []
        rounds_b: list[dict[str, float]] = []
        for _ in range(rounds):
            for client, out in (
                (AiohttpMetricsSource(), rounds_a),
                (sources.MetricsDataSource(), rounds_b),
            ):
                out.append(await _measure(client, endpoints, interval_s, seconds))
    finally:
        child.terminate()
        child.join()
    baseline, lean = _median(rounds_a), _median(rounds_b)
    return {
        "rounds": rounds,
        "endpoints": count,
        "interval_s": interval_s,
        "page_bytes": len(page),
        "page_lines": page.count("\n"),
        "extract_only_us": _extract_only(page),
        "aiohttp": baseline,
        "lean": lean,
        "lean_vs_aiohttp_cpu_ratio": lean["cpu_us_per_scrape"] / baseline["cpu_us_per_scrape"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.05, help="scrape interval, s")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = parser.parse_args()
    result = asyncio.run(run(args.endpoints, args.seconds, args.interval, args.rounds))
    for name in ("aiohttp", "lean"):
        r = result[name]
        print(
            f"{name:8} {result['endpoints']} endpoints @ {args.interval * 1000:g} ms: "
            f"{r['scrapes_per_s']:.0f}/{r['target_scrapes_per_s']:.0f} scrapes/s, "
            f"{r['core_percent']:.1f}% of a core, {r['cpu_us_per_scrape']:.0f} µs/scrape, "
            f"{r['cpu_us_per_endpoint_second']:.0f} µs CPU per endpoint-second"
        )
    print(
        f"extractor alone: {result['extract_only_us']:.1f} µs per page; "
        f"lean/aiohttp CPU per scrape: {result['lean_vs_aiohttp_cpu_ratio']:.2f}"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
