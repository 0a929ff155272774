"""`sluice demo`: a whole inference gateway on one machine, ready for curl.

Starts N simulated vLLM servers (a child `sluice simulate` process), the picker (in this
process), and a real Envoy (child process) wired as in production: Envoy's ext_proc
filter asks the picker where each request goes. A live view shows what the picker sees
per endpoint and what each server has served, so routing decisions can be watched.
Ctrl-C stops everything; no child process outlives the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from epp import logfmt
from epp.datalayer import prometheus_text
from epp.picker import Picker, PickerOptions
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.sim import child_process


@dataclass(frozen=True, slots=True)
class DemoOptions:
    replicas: int = 4
    gateway_port: int = 8081
    model: str = "sim-model"
    time_scale: float = 1.0
    max_num_seqs: int = 8
    replica_speeds: str = "1"  # `sluice simulate --replica-speeds`: a heterogeneous pool
    view: bool = True
    config_file: str | None = None


@contextlib.asynccontextmanager
async def simulators(options: DemoOptions) -> AsyncIterator[list[str]]:
    args = [
        "--model", options.model,
        "--time-scale", str(options.time_scale),
        "--max-num-seqs", str(options.max_num_seqs),
        "--replica-speeds", options.replica_speeds,
    ]  # fmt: skip
    async with child_process.simulator_process(options.replicas, args) as addresses:
        yield addresses


@dataclass
class _Row:
    pod: str = "?"
    served: int = 0
    prefix_hits: str = "-"


async def _server_rows(session: aiohttp.ClientSession, addresses: list[str]) -> dict[str, _Row]:
    rows: dict[str, _Row] = {}
    for address in addresses:
        row = _Row()
        with contextlib.suppress(aiohttp.ClientError, ValueError):
            async with session.get(f"http://{address}/sim/state") as r:
                state = await r.json()
                row.pod = str(state.get("pod", "?"))
                row.served = int(state.get("requests_received", 0))
            async with session.get(f"http://{address}/metrics") as r:
                page = prometheus_text.MetricsPage(await r.text())
                hits = sum(s.value for s in page.samples("vllm:prefix_cache_hits_total"))
                queries = sum(s.value for s in page.samples("vllm:prefix_cache_queries_total"))
                if queries:
                    row.prefix_hits = f"{hits / queries:.0%}"
        rows[address] = row
    return rows


def render_view(picker: Picker, rows: dict[str, _Row], gateway_url: str) -> str:
    now = time.monotonic()
    lines = [
        f"Sluice demo — gateway {gateway_url}   (Ctrl-C to stop)",
        "",
        f"{'pod':<8} {'endpoint':<22} {'queue':>5} {'running':>7} {'KV':>6} "
        f"{'prefix hit':>10} {'in flight':>9} {'served':>7}",
    ]
    in_flight = picker.in_flight.per_endpoint
    for endpoint in picker.reconciler.current.endpoints:
        m = picker.metrics_store.get(endpoint.key)
        row = rows.get(endpoint.target, _Row())
        stale = " (stale)" if m.is_stale(now, picker.options.metrics_staleness_threshold_s) else ""
        lines.append(
            f"{row.pod:<8} {endpoint.target:<22} {m.waiting_queue_size:>5} "
            f"{m.running_requests:>7} {m.kv_cache_usage:>6.1%} {row.prefix_hits:>10} "
            f"{in_flight.get(endpoint.key, 0):>9} {row.served:>7}{stale}"
        )
    return "\n".join(lines)


async def _live_view(picker: Picker, addresses: list[str], gateway_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            rows = await _server_rows(session, addresses)
            # Clear the screen and redraw from the top-left corner.
            sys.stdout.write("\x1b[2J\x1b[H" + render_view(picker, rows, gateway_url) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(1.0)


async def run(options: DemoOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with simulators(options) as addresses:
        picker = Picker(
            PickerOptions(
                host="127.0.0.1",
                grpc_port=0,
                health_port=0,
                metrics_port=0,
                endpoints=",".join(addresses),
                secure_serving=False,
                config_file=None if options.config_file is None else Path(options.config_file),
                shutdown_grace_s=2.0,
            )
        )
        # The picker first: Envoy health-checks it and would fail requests until it is up.
        await picker.start()
        try:
            gateway = gateway_settings.GatewayOptions(
                mode=gateway_settings.GatewayMode.PICKER,
                listen_port=options.gateway_port,
                picker_port=picker.grpc_port,
                # The demo knows every endpoint: a refused connection is retried on the
                # picker's fallbacks, then on the other servers.
                destination_cluster=gateway_settings.DestinationCluster.OVERRIDE_HOST,
                backends=tuple(addresses),
            )
            async with EnvoyProcess(gateway) as envoy:
                url = envoy.url
                print(_banner(url, options, picker), flush=True)
                view = None
                if options.view and sys.stdout.isatty():
                    view = asyncio.create_task(_live_view(picker, addresses, url))
                await stop.wait()
                if view is not None:
                    view.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await view
        finally:
            await picker.stop()
    print("sluice demo: stopped", flush=True)


def _banner(url: str, options: DemoOptions, picker: Picker) -> str:
    body = f'{{"model": "{options.model}", "prompt": "Say hello", "max_tokens": 16}}'
    return "\n".join(
        [
            f"Gateway: {url}",
            f"Picker metrics: http://127.0.0.1:{picker.metrics_port}/metrics",
            "Try:",
            f"  curl -si {url}/v1/completions -H 'content-type: application/json' -d '{body}'",
        ]
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sluice demo", description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4, help="simulated vLLM servers")
    p.add_argument("--gateway-port", type=int, default=8081, help="Envoy listener port (0 = any)")
    p.add_argument("--model", default="sim-model")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulated time multiplier")
    p.add_argument("--max-num-seqs", type=int, default=8, help="batch size of each server")
    p.add_argument(
        "--replica-speeds",
        default="1",
        metavar="S,S,...",
        help="speed of each server, cycled (e.g. 1,0.5: every other server half as fast)",
    )
    p.add_argument("--config-file", default=None, help="EndpointPickerConfig for the picker")
    p.add_argument("--no-view", dest="view", action="store_false", help="no live pool view")
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    if not 1 <= args.replicas <= 64:
        p.error("--replicas must be between 1 and 64")
    logfmt.configure(args.verbose)
    options = DemoOptions(
        replicas=args.replicas,
        gateway_port=args.gateway_port,
        model=args.model,
        time_scale=args.time_scale,
        max_num_seqs=args.max_num_seqs,
        replica_speeds=args.replica_speeds,
        view=args.view,
        config_file=args.config_file,
    )
    try:
        asyncio.run(run(options))
    except (RuntimeError, OSError, ValueError) as error:
        print(f"sluice demo: {error}", file=sys.stderr)
        return 1
    return 0
