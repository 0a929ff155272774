"""TTFT under skewed shared-prefix load: round-robin, the default picker, the
predicted-latency picker and sglang-router's cache-aware policy, same pool, same run.

Eight simulated vLLM servers whose KV caches hold a fraction of all prefixes; 24 prefix
groups whose popularity is Zipf-skewed (exponent 1.2: the hottest group alone is about
a quarter of the traffic, more than one server can serve); open-loop Poisson load at 50,
80 and 100% of the pool's capacity (measured first, closed loop, Envoy least-request).
Every router gets the same warm-up pass (which also trains the latency predictor).

sglang-router is a separate install (`scripts/setup test,compare`); without it that
column is skipped with a note.

    .venv/bin/python -m bench.skewed_prefix            # ~15 minutes
    .venv/bin/python -m bench.skewed_prefix --quick    # ~6 minutes, noisier

To diagnose or compare a candidate profile cheaply: `--routers default,predicted-latency
--loads 0.8 --capacity 16.6`, and `--config NAME=PATH` adds a picker with that config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from bench.harness import child, direct_envoy, picker, simulators, wait_http
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port
from sluice.loadgen import plots, runner, summary, workloads

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS = HERE.parent / "docs" / "configs"
SIM_ARGS = [
    "--max-num-seqs", "4",
    "--time-to-first-token", "20",
    "--prefill-time-per-token", "0.5",
    "--inter-token-latency", "20",
    "--kv-cache-size", "600",
    "--block-size", "16",
]  # fmt: skip


def workload(seed: int) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind="shared-prefix", groups=24, prefix_tokens=800, question_tokens=40,
        max_tokens=16, prefix_skew=1.2, seed=seed,
    )  # fmt: skip


def sglang_router_binary() -> str | None:
    found = shutil.which("sglang-router", path=str(Path(sys.executable).parent))
    return found or shutil.which("sglang-router")


@asynccontextmanager
async def sglang_router(backends: Sequence[str]) -> AsyncIterator[str]:
    binary = sglang_router_binary()
    assert binary is not None
    port, metrics_port = free_tcp_port(), free_tcp_port()
    async with child(
        binary, "launch", "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--policy", "cache_aware",
        "--worker-urls", *(f"http://{b}" for b in backends),
    ):  # fmt: skip
        await wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60)
        yield f"http://127.0.0.1:{port}"


async def measure(
    url: str, requests: int, rate: float | None, seed: int, concurrency: int = 64
) -> list[runner.RequestResult]:
    plan = runner.LoadPlan(
        url=url, requests=requests, rate=rate, concurrency=concurrency, seed=seed
    )
    return await runner.run_load(plan, workloads.generate(workload(seed)))


async def run(args: argparse.Namespace) -> dict[str, object]:
    loads: list[float] = args.loads
    out: dict[str, object] = {"loads": loads, "sim_args": SIM_ARGS}
    async with AsyncExitStack() as stack:
        backends = await stack.enter_async_context(simulators(8, SIM_ARGS))
        urls: dict[str, str] = {}
        direct = {
            "round-robin": gateway_settings.LbPolicy.ROUND_ROBIN,
            "least-request": gateway_settings.LbPolicy.LEAST_REQUEST,
        }
        for name, policy in direct.items():
            urls[name] = await stack.enter_async_context(direct_envoy(backends, policy))
        configs: dict[str, Path | None] = {
            "default": None,
            "predicted-latency": CONFIGS / "predicted-latency.yaml",
        }
        configs.update(args.config)
        for name, config in configs.items():
            if args.routers and name not in args.routers:
                continue
            extra = ["--response-sample-rate", str(args.sample_rate)]
            extra += ["--config-file", str(config)] if config else []
            _, port = await stack.enter_async_context(picker(backends, extra))
            options = gateway_settings.GatewayOptions(picker_port=port)
            urls[name] = (await stack.enter_async_context(EnvoyProcess(options))).url
        if args.routers and "sglang-router" not in args.routers:
            pass
        elif sglang_router_binary():
            urls["sglang-router"] = await stack.enter_async_context(sglang_router(backends))
        else:
            print("sglang-router not installed (scripts/setup test,compare): skipped")
        capacity = (
            args.capacity
            or summary.summarise(
                await measure(urls["least-request"], args.calibration_requests, None, seed=99)
            ).throughput_rps
        )
        out["capacity_rps"] = capacity
        print(f"pool capacity (closed loop, least-request): {capacity:.1f} req/s", flush=True)
        del urls["least-request"]  # the calibration reference, not a contender here
        if args.routers:
            urls = {name: url for name, url in urls.items() if name in args.routers}
        series: dict[str, list[tuple[float, summary.Summary]]] = {name: [] for name in urls}
        rows = []
        for name, url in urls.items():
            await measure(url, args.warmup_requests, None, seed=7, concurrency=8)
            for load in loads:
                rate = capacity * load
                requests = max(50, int(rate * args.seconds))
                results = await measure(url, requests, rate, seed=int(load * 100))
                runner.write_jsonl(results, RESULTS / f"skewed_{name}_{int(load * 100)}.jsonl")
                s = summary.summarise(results)
                series[name].append((load, s))
                rows.append((f"{name} @ {load:.0%}", s))
                print(summary.table([rows[-1]]).splitlines()[-1], flush=True)
        out["runs"] = {
            name: [{"load": load, **asdict(s)} for load, s in points]
            for name, points in series.items()
        }
        table = summary.table(rows)
        out["table"] = table
        print(table)
        at_80 = {name: dict(points)[0.8] for name, points in series.items() if 0.8 in loads}
        rr = at_80["round-robin"].ttft_p90_s if "round-robin" in at_80 else None
        for name, s in at_80.items():
            versus = f" (round-robin / it = {rr / s.ttft_p90_s:.1f}x)" if rr else ""
            print(
                f"at 80%: {name} TTFT p90 {s.ttft_p90_s * 1000:.0f} ms{versus}, "
                f"prefix hit {s.prefix_hit_rate:.0%}"
            )
        try:
            plots.plot_comparison(
                series, RESULTS / "skewed_prefix.png", "Skewed shared prefixes, 8 servers"
            )
        except RuntimeError as error:
            print(f"no plot: {error}")
    return out


def _named_path(value: str) -> tuple[str, Path]:
    name, _, path = value.partition("=")
    return name, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="per load level and router")
    parser.add_argument("--calibration-requests", type=int, default=500)
    parser.add_argument("--warmup-requests", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--sample-rate", type=float, default=1.0,
        help="pickers' --response-sample-rate: the responses the latency predictor learns "
        "from (the picker's default 0.01 leaves it cold for a run this short)",
    )  # fmt: skip
    parser.add_argument(
        "--routers", type=lambda v: set(v.split(",")), default=set(),
        help="only these (comma-separated; default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--loads", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.8, 1.0],
        help="fractions of capacity (comma-separated)",
    )  # fmt: skip
    parser.add_argument("--capacity", type=float, default=0.0, help="req/s; skips calibration")
    parser.add_argument(
        "--config", type=_named_path, action="append", default=[],
        help="NAME=PATH: also run a picker with this config",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.calibration_requests = 15.0, 250
    results = asyncio.run(run(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "skewed_prefix.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
