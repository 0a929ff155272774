"""`sluice demo`: a whole inference gateway on one machine, ready for curl.

Starts N simulated vLLM servers (a child `sluice simulate` process), the picker (in this
process), and a real Envoy (child process) wired as in production: Envoy's ext_proc
filter asks the picker where each request goes. A live view shows what the picker sees
per endpoint, what each server has served and, with `--flow-control`, the picker's queue
by priority band; under a pipe a status line is printed instead. `--scenario overload`
drives three workloads of different criticality above the pool's capacity, so priority
can be watched at work. Ctrl-C stops everything; no child process outlives the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from epp import arguments, logfmt
from sluice import overload, pool_view
from sluice.gateway import local
from sluice.sim import child_process

SCENARIOS = ("overload",)
_TTY_REFRESH_S = 1.0
_PIPE_REFRESH_S = 5.0


@dataclass(frozen=True, slots=True)
class DemoOptions:
    replicas: int = 4
    gateway_port: int = 8081
    metrics_port: int = 0
    model: str = "sim-model"
    time_scale: float = 1.0
    max_num_seqs: int = 8
    replica_speeds: str = "1"  # `sluice simulate --replica-speeds`: a heterogeneous pool
    view: bool = True
    config_file: str | None = None
    flow_control: bool = False
    scenario: str | None = None
    refresh_interval_s: float | None = None  # None: 1 s on a terminal, 5 s under a pipe

    @property
    def speeds(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.replica_speeds.split(","))


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


async def run(options: DemoOptions) -> None:
    stop = local.stop_event()
    async with simulators(options) as addresses:
        gateway_options = local.LocalGatewayOptions(
            endpoints=",".join(addresses),
            config_file=None if options.config_file is None else Path(options.config_file),
            flow_control=options.flow_control,
            port=options.gateway_port,
            metrics_port=options.metrics_port,
        )
        async with local.running(gateway_options) as gateway:
            header = pool_view.Header(
                gateway_url=gateway.url,
                metrics_url=gateway.metrics_url,
                try_command=local.try_command(
                    gateway.url, options.model, "fraud" if gateway.flow_control else None
                ),
                flow_control=gateway.flow_control,
            )
            print(_banner(header), flush=True)
            scenario = None
            if options.scenario == "overload":
                capacity = overload.capacity_rps(
                    options.replicas, options.max_num_seqs, options.speeds, options.time_scale
                )
                scenario = overload.OverloadScenario(gateway.url, options.model, capacity)
                scenario.start()
            view = None
            if options.view:
                view = asyncio.create_task(_show(options, gateway, header, addresses, scenario))
            try:
                await stop.wait()
            finally:
                if view is not None:
                    view.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await view
                if scenario is not None:
                    await scenario.stop()
    print("sluice demo: stopped", flush=True)


async def _show(
    options: DemoOptions,
    gateway: local.RunningGateway,
    header: pool_view.Header,
    addresses: list[str],
    scenario: overload.OverloadScenario | None,
) -> None:
    """Redraw the view on a terminal; print a status line under a pipe."""
    tty = sys.stdout.isatty()
    interval_s = options.refresh_interval_s or (_TTY_REFRESH_S if tty else _PIPE_REFRESH_S)
    workloads = [w.name for w in overload.WORKLOADS] if scenario is not None else []
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        first = True
        while True:
            frame = await pool_view.collect(session, gateway.metrics_url, addresses, workloads)
            if tty:
                screen = pool_view.render_screen(header, gateway.picker, frame, scenario)
                # Home, each line cleared to its end, then everything below: no flicker, and
                # the URLs at the top are redrawn every time. The first frame clears all.
                body = "\x1b[K\n".join(screen.splitlines())
                sys.stdout.write(("\x1b[2J" if first else "") + "\x1b[H" + body + "\x1b[K\n\x1b[J")
            else:
                sys.stdout.write(pool_view.status_line(frame, scenario) + "\n")
            sys.stdout.flush()
            first = False
            await asyncio.sleep(interval_s)


def _banner(header: pool_view.Header) -> str:
    lines = [
        f"Gateway: {header.gateway_url}",
        f"Picker metrics: {header.metrics_url}/metrics",
    ]
    if header.flow_control:
        lines.append(f"Workload API: {header.metrics_url}/api/v1/workload/<id>/metrics")
    lines += ["Try:", f"  {header.try_command}"]
    return "\n".join(lines)


def _speeds(text: str) -> str:
    try:
        speeds = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected speeds like 1,0.5, got {text!r}") from None
    if not all(0 < s < 1000 for s in speeds):
        raise argparse.ArgumentTypeError(f"speeds must be positive numbers, got {text!r}")
    return text


def main(argv: list[str]) -> int:
    p = arguments.OneLineParser(prog="sluice demo", description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4, help="simulated vLLM servers")
    p.add_argument("--gateway-port", type=arguments.port, default=8081,
                   help="Envoy listener port (0 = any)")  # fmt: skip
    p.add_argument(
        "--metrics-port",
        type=arguments.port,
        default=0,
        help="the picker's /metrics and workload API port (default 0: a free port, printed)",
    )
    p.add_argument("--model", default="sim-model")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulated time multiplier")
    p.add_argument("--max-num-seqs", type=int, default=8, help="batch size of each server")
    p.add_argument(
        "--replica-speeds",
        type=_speeds,
        default="1",
        metavar="S,S,...",
        help="speed of each server, cycled (e.g. 1,0.5: every other server half as fast)",
    )
    p.add_argument("--config-file", default=None, help="EndpointPickerConfig for the picker")
    p.add_argument(
        "--flow-control",
        action="store_true",
        help="workload-aware flow control (the shipped preset: sluice/presets/)",
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=None,
        help="drive load from the demo itself; 'overload': three workloads of different "
        "criticality above the pool's capacity (implies --flow-control)",
    )
    p.add_argument(
        "--refresh-interval",
        type=arguments.duration,
        default=None,
        help="how often the view is redrawn (default 1s) or, under a pipe, a status line "
        "printed (default 5s)",
    )
    p.add_argument("--no-view", dest="view", action="store_false",
                   help="no live view and no status lines")  # fmt: skip
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    if not 1 <= args.replicas <= 64:
        p.error("--replicas must be between 1 and 64")
    if args.max_num_seqs < 1:
        p.error("--max-num-seqs must be at least 1")
    if args.time_scale <= 0:
        p.error(f"--time-scale must be > 0 (got {args.time_scale})")
    if args.refresh_interval is not None and args.refresh_interval <= 0:
        p.error("--refresh-interval must be positive")
    flow_control = args.flow_control or args.scenario == "overload"
    if flow_control and args.config_file is not None:
        p.error(
            "--flow-control (implied by --scenario overload) runs the shipped preset; "
            "drop --config-file, or put 'featureGates: [flowControl]' in your file"
        )
    logfmt.configure(args.verbose)
    options = DemoOptions(
        replicas=args.replicas,
        gateway_port=args.gateway_port,
        metrics_port=args.metrics_port,
        model=args.model,
        time_scale=args.time_scale,
        max_num_seqs=args.max_num_seqs,
        replica_speeds=args.replica_speeds,
        view=args.view,
        config_file=args.config_file,
        flow_control=flow_control,
        scenario=args.scenario,
        refresh_interval_s=args.refresh_interval,
    )
    try:
        asyncio.run(run(options))
    except (RuntimeError, OSError, ValueError) as error:  # EnvoyError, ConfigError among them
        print(f"sluice demo: {error}", file=sys.stderr)
        return 1
    return 0
