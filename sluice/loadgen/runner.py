"""Sends a workload at a gateway and records one result per request.

Open loop: arrivals follow a Poisson process at `rate` requests per second, whatever the
server does (the honest way to measure latency under load). Closed loop: `concurrency`
requests in flight at all times (the way to find capacity).
"""

from __future__ import annotations

import asyncio
import errno
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson

from sluice.loadgen import progress as progress_line
from sluice.loadgen.workloads import RequestSpec


@dataclass(frozen=True, slots=True)
class RequestResult:
    start_s: float  # since the run started
    status: int
    pod: str
    group: str
    ttft_s: float | None
    tpot_s: float | None
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    error: str = ""  # why it failed: a connection error, or the body of a non-200 answer
    criticality: int | None = None  # X-Workload-Context criticality sent, if any


@dataclass(frozen=True, slots=True)
class LoadPlan:
    url: str  # the gateway's base URL, e.g. http://127.0.0.1:8081
    requests: int
    rate: float | None = None  # open loop (req/s); None = closed loop
    concurrency: int = 16
    timeout_s: float = 300.0
    seed: int = 0
    progress: bool = False


def _usage_of(event: dict[str, object]) -> tuple[int, int, int] | None:
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return (
        int(usage.get("prompt_tokens", 0) or 0),
        int(usage.get("completion_tokens", 0) or 0),
        int(cached or 0),
    )


async def send_one(
    session: aiohttp.ClientSession, base_url: str, spec: RequestSpec, run_start: float
) -> RequestResult:
    started = time.perf_counter()
    first = last = None
    usage = (0, 0, 0)
    status, pod, error = 0, "", ""
    try:
        async with session.post(base_url + spec.path, data=spec.body, headers=spec.headers) as r:
            status, pod = r.status, r.headers.get("x-inference-pod", "")
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                async for line in r.content:
                    if not line.startswith(b"data:") or line.startswith(b"data: [DONE]"):
                        continue
                    now = time.perf_counter()
                    event = orjson.loads(line[5:])
                    if isinstance(event, dict):
                        found = _usage_of(event)
                        if found is not None:
                            usage = found
                        if event.get("choices"):
                            first = first or now
                            last = now
            else:
                payload = await r.read()
                last = first = time.perf_counter()
                if status == 200:
                    document = orjson.loads(payload)
                    usage = _usage_of(document) or usage
                else:
                    error = payload[:200].decode(errors="replace")
    except aiohttp.ClientConnectorError as exc:
        error = _cannot_connect(base_url, exc)
    except aiohttp.ClientError as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    except TimeoutError:
        error = f"no complete answer within {session.timeout.total:g}s"
    except orjson.JSONDecodeError:
        error = "the response is not valid JSON"
    end = time.perf_counter()
    ttft = (first - started) if first is not None else None
    tpot = None
    if first is not None and last is not None and usage[1] > 1:
        tpot = (last - first) / (usage[1] - 1)
    return RequestResult(
        start_s=started - run_start,
        status=status,
        pod=pod,
        group=spec.group,
        ttft_s=ttft,
        tpot_s=tpot,
        latency_s=end - started,
        prompt_tokens=usage[0],
        completion_tokens=usage[1],
        cached_tokens=usage[2],
        slo_ttft_ms=spec.slo_ttft_ms,
        slo_tpot_ms=spec.slo_tpot_ms,
        error=error,
        criticality=spec.criticality,
    )


def _cannot_connect(base_url: str, exc: aiohttp.ClientConnectorError) -> str:
    """The same words for every request that failed the same way, so failures group."""
    url = urlsplit(base_url)
    origin = f"{url.scheme}://{url.netloc}/"
    if exc.os_error.errno == errno.ECONNREFUSED:
        return f"connection refused to {origin}"
    return f"cannot connect to {origin}: {exc.os_error.strerror or exc.os_error}"


async def run_load(plan: LoadPlan, workload: Iterator[RequestSpec]) -> list[RequestResult]:
    results: list[RequestResult] = []
    progress = progress_line.Progress(plan.requests, sys.stderr) if plan.progress else None
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        run_start = time.perf_counter()

        async def one(spec: RequestSpec) -> None:
            if progress is not None:
                progress.request_sent()
            result = await send_one(session, plan.url, spec, run_start)
            results.append(result)
            if progress is not None:
                progress.request_finished(succeeded(result))

        showing = asyncio.create_task(progress.run()) if progress is not None else None

        if plan.rate is not None:
            rng = random.Random(plan.seed)
            tasks = []
            next_at = time.perf_counter()
            for _ in range(plan.requests):
                next_at += rng.expovariate(plan.rate)
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(next(workload))))
            await asyncio.gather(*tasks)
        else:
            remaining = iter(range(plan.requests))

            async def worker() -> None:
                for _ in remaining:
                    await one(next(workload))

            await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
        if showing is not None and progress is not None:
            showing.cancel()
            progress.close()
    results.sort(key=lambda r: r.start_s)
    return results


def succeeded(result: RequestResult) -> bool:
    """A 200 answered to its end (a stream cut short is a failure with its reason)."""
    return result.status == 200 and not result.error


def write_jsonl(results: list[RequestResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for result in results:
            out.write(orjson.dumps(asdict(result)) + b"\n")


def read_jsonl(path: Path) -> list[RequestResult]:
    with path.open("rb") as source:
        return [RequestResult(**orjson.loads(line)) for line in source if line.strip()]
