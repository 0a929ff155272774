"""Soak: hours of small requests with hostile input mixed in; is the picker's memory flat?

Two simulated backends behind the shipped Envoy config and `sluice picker` with flow
control, open-loop load at `--rate` for `--duration`. 90% of requests are well formed (the
served model, one of 20 workloads); 10% are hostile, in equal parts: a random model name,
a random workload id, malformed headers (bad JSON in X-Workload-Context, a non-numeric SLO
header), and a slow body (declares 64 KB, sends 1 KB, stops; answered at the body
deadline). Every `--sample-every` seconds it records the picker's RSS, the number of
series on its /metrics page and how long that page took, and the p99 and errors of the
well-formed requests in the window. Reports the RSS slope after warm-up (least squares
over the samples after the first 20%), and writes a plot.

    .venv/bin/python -m bench.soak --rate 100 --duration 1800      # 30 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp

from bench.harness import PYTHON, child, simulators, wait_http
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port

HERE = Path(__file__).resolve().parent
MODEL = "sim-model"
CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: workload-aware-ordering-policy
"""


async def wait_tcp(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            await asyncio.sleep(0.1)
        else:
            writer.close()
            return


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Window:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.good_errors: dict[str, int] = {}
        self.hostile: dict[str, int] = {}

    def error(self, reason: str) -> None:
        self.good_errors[reason] = self.good_errors.get(reason, 0) + 1


async def well_formed(
    session: aiohttp.ClientSession, url: str, rng: random.Random, w: Window
) -> None:
    workload = json.dumps({"workload_id": f"team-{rng.randrange(20)}", "criticality": 3})
    body = {"model": MODEL, "prompt": "soak " * 8, "max_tokens": 4}
    started = time.perf_counter()
    try:
        async with session.post(url, json=body, headers={"x-workload-context": workload}) as r:
            await r.read()
            if r.status != 200:
                w.error(f"HTTP {r.status}")
                return
    except (aiohttp.ClientError, TimeoutError) as error:
        w.error(type(error).__name__)
        return
    w.latencies.append(time.perf_counter() - started)


async def hostile(
    session: aiohttp.ClientSession, url: str, port: int, rng: random.Random, w: Window
) -> None:
    kind = rng.choice(("random-model", "random-workload", "bad-headers", "slow-body"))
    w.hostile[kind] = w.hostile.get(kind, 0) + 1
    if kind == "slow-body":
        await slow_body(port)
        return
    headers = {}
    model = MODEL
    if kind == "random-model":
        model = f"m-{rng.getrandbits(48):x}"
    elif kind == "random-workload":
        headers["x-workload-context"] = json.dumps({"workload_id": f"w-{rng.getrandbits(48):x}"})
    else:
        headers["x-workload-context"] = "{not json"
        headers["x-slo-ttft-ms"] = "soon"
    try:
        async with session.post(
            url, json={"model": model, "prompt": "x", "max_tokens": 2}, headers=headers
        ) as r:
            await r.read()
    except (aiohttp.ClientError, TimeoutError):
        pass


async def slow_body(port: int) -> None:
    """Declares 64 KB, sends 1 KB, then waits for the gateway's answer (408 expected)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        head = (
            "POST /v1/completions HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n"
            "content-length: 65536\r\n\r\n"
        )
        writer.write(head.encode() + b'{"model": "sim-model", "prompt": "' + b"x" * 1000)
        await writer.drain()
        await asyncio.wait_for(reader.read(1024), timeout=120)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.get(url) as r:
        text = await r.text()
    took = time.perf_counter() - started
    return sum(1 for line in text.splitlines() if line and not line.startswith("#")), took


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def slope_per_hour(samples: list[dict[str, float]]) -> float:
    """Least-squares slope of RSS (MB per hour) over the samples after warm-up."""
    tail = samples[len(samples) // 5 :]
    if len(tail) < 2:
        return float("nan")
    xs = [s["t_s"] / 3600 for s in tail]
    ys = [s["rss_mb"] for s in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def run(args: argparse.Namespace) -> dict[str, object]:
    sim_args = ["--time-to-first-token", "2", "--inter-token-latency", "1", "--max-num-seqs", "256"]
    samples: list[dict[str, float]] = []
    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(2, sim_args))
        grpc, health, metrics_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
        metrics_url: str | None = None
        if args.ext_proc == "null":  # the protocol floor: what gRPC and Envoy alone cost
            picker = await stack.enter_async_context(
                child(
                    PYTHON, str(HERE / "null_extproc.py"), "--port", str(grpc),
                    "--endpoints", ",".join(backends),
                )
            )  # fmt: skip
            await wait_tcp(grpc)
        else:
            picker = await stack.enter_async_context(
                child(
                    PYTHON, "-m", "sluice.cli", "picker",
                    "--endpoints", ",".join(backends), "--host", "127.0.0.1",
                    "--grpc-port", str(grpc), "--grpc-health-port", str(health),
                    "--metrics-port", str(metrics_port), "--secure-serving=false",
                    "--config-text", CONFIG, "--request-body-timeout", args.body_timeout,
                )
            )  # fmt: skip
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            await wait_http(metrics_url)
        envoy = await stack.enter_async_context(
            EnvoyProcess(envoy_config.GatewayOptions(picker_port=grpc), concurrency=1)
        )
        url = envoy.url + "/v1/completions"
        port = int(envoy.url.rsplit(":", 1)[1])
        rng = random.Random(args.seed)
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=timeout, connector=connector)
        )
        tasks: set[asyncio.Task[None]] = set()
        window = Window()
        t0 = time.monotonic()
        next_sample = t0 + args.sample_every
        sent = 0
        while (now := time.monotonic()) < t0 + args.duration:
            due = t0 + sent / args.rate
            if due > now:
                await asyncio.sleep(due - now)
            if rng.random() < args.hostile:
                coro = hostile(session, url, port, rng, window)
            else:
                coro = well_formed(session, url, rng, window)
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            if time.monotonic() >= next_sample:
                series, took = 0, 0.0
                if metrics_url is not None:
                    series, took = await scrape(session, metrics_url)
                sample = {
                    "t_s": time.monotonic() - t0,
                    "rss_mb": rss_mb(picker.pid),
                    "series": series,
                    "metrics_render_ms": took * 1000,
                    "good_requests": len(window.latencies),
                    "good_p99_ms": p99(window.latencies) * 1000,
                    "good_errors": sum(window.good_errors.values()),
                    "in_flight": len(tasks),
                }
                samples.append(sample)
                print(json.dumps({**sample, "errors": window.good_errors}), flush=True)
                window = Window()
                next_sample += args.sample_every
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "ext_proc": args.ext_proc,
        "rate": args.rate,
        "duration_s": args.duration,
        "hostile_fraction": args.hostile,
        "requests": sent,
        "rss_slope_mb_per_hour": slope_per_hour(samples),
        "samples": samples,
    }


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    assert isinstance(samples, list)
    minutes = [s["t_s"] / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(minutes, [s["rss_mb"] for s in samples])
    top.set_ylabel("picker RSS (MB)")
    top.set_ylim(bottom=0)
    bottom.plot(minutes, [s["good_p99_ms"] for s in samples])
    bottom.set_ylabel("well-formed p99 (ms)")
    bottom.set_xlabel("minutes")
    bottom.set_ylim(bottom=0)
    fig.suptitle(
        f"soak: {result['requests']} requests, {result['hostile_fraction']:.0%} hostile, "
        f"RSS slope {result['rss_slope_mb_per_hour']:+.1f} MB/h after warm-up"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds")
    parser.add_argument("--hostile", type=float, default=0.10, help="share of hostile requests")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    parser.add_argument("--body-timeout", default="5s", help="picker --request-body-timeout")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--ext-proc",
        choices=("picker", "null"),
        default="picker",
        help="null: the do-nothing ext_proc server (bench/null_extproc.py) in the picker's place",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    parser.add_argument("--plot", type=Path, default=HERE / "figures" / "soak.png")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    samples = result["samples"]
    assert isinstance(samples, list)
    print(
        f"{result['requests']} requests; RSS {samples[0]['rss_mb']:.0f} -> "
        f"{samples[-1]['rss_mb']:.0f} MB, slope after warm-up "
        f"{result['rss_slope_mb_per_hour']:+.1f} MB/h; series "
        f"{samples[0]['series']} -> {samples[-1]['series']}; well-formed errors "
        f"{sum(s['good_errors'] for s in samples)}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
