"""Cost of the data layer's per-tick work (not collected by pytest; run by hand).

    python -m tests.datalayer.bench_scrape            # parsing and extraction only
    python -m tests.datalayer.bench_scrape --http 20  # plus a collector scraping 20
                                                      # endpoints over real HTTP

The HTTP figure is the collector process's CPU time per scrape; the servers run in a
child process so that their CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import time
import timeit

from epp.datalayer import collector as collecting
from epp.datalayer import extractors, prometheus_text
from epp.datalayer.endpoint_metrics import NEVER_SCRAPED, MetricsStore
from epp.datastore.snapshot import Endpoint, EndpointKey
from tests.datalayer import pages


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} µs"


def bench_parsing() -> None:
    text = pages.vllm_page(waiting=3, running=7, kv_usage=0.4, lora_series=[("a", "", 4, 1e9)])
    endpoint = Endpoint(EndpointKey("ns/p-rank-0"), "p", "ns", "127.0.0.1", 8000)
    extractor = extractors.CoreMetricsExtractor()
    lines, size = len(text.splitlines()), len(text)
    print(f"vLLM page: {lines} lines, {size} bytes")

    def lazy() -> None:
        extractor.extract(prometheus_text.MetricsPage(text), endpoint, NEVER_SCRAPED)

    def full() -> None:
        prometheus_text.parse(text)

    for label, func in (("MetricsPage + core-metrics-extractor", lazy), ("full parse()", full)):
        runs = 2000 if func is lazy else 200
        best = min(timeit.repeat(func, number=runs, repeat=5)) / runs
        print(f"  {label:<40} {_us(best)} per page")


def _serve(port_queue: multiprocessing.Queue[int], count: int) -> None:
    from aiohttp import web

    text = pages.vllm_page(waiting=3, running=7, kv_usage=0.4)

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/plain")

    async def main() -> None:
        runners = []
        for _ in range(count):
            app = web.Application()
            app.router.add_get("/metrics", handle)
            runner = web.AppRunner(app, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            port_queue.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _ticks(collector: collecting.Collector, endpoints: list[Endpoint]) -> int:
    statuses = [collector.status(endpoint.key) for endpoint in endpoints]
    return sum(status.ticks for status in statuses if status is not None)


async def bench_http(count: int, seconds: float) -> None:
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    child = multiprocessing.Process(target=_serve, args=(ports, count), daemon=True)
    child.start()
    try:
        endpoints = [
            Endpoint(EndpointKey(f"ns/p{i}-rank-0"), f"p{i}", "ns", "127.0.0.1", ports.get(10))
            for i in range(count)
        ]
        store = MetricsStore()
        collector = collecting.Collector(store, interval_s=0.05)
        await collector.start()
        collector.update_endpoints(endpoints)
        await asyncio.sleep(1.0)  # warm up: connections open, first pages parsed
        ticks_before = _ticks(collector, endpoints)
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        wall_before = time.monotonic()
        await asyncio.sleep(seconds)
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - wall_before
        ticks = _ticks(collector, endpoints) - ticks_before
        await collector.stop()
        cpu = cpu_after.ru_utime - cpu_before.ru_utime + cpu_after.ru_stime - cpu_before.ru_stime
        print(
            f"{count} endpoints at 50 ms: {ticks / wall:.0f} scrapes/s, "
            f"collector CPU {cpu / wall * 100:.1f}% of a core, {_us(cpu / ticks)} per scrape"
        )
    finally:
        child.terminate()
        child.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=0, help="endpoints to scrape over HTTP")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    bench_parsing()
    if args.http:
        asyncio.run(bench_http(args.http, args.seconds))


if __name__ == "__main__":
    main()
