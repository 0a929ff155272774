"""`sluice gateway`: a real Envoy and the picker in front of model servers already running.

The demo without the simulators: the servers come from `--endpoints` or `--manifests`
(as `sluice picker` takes them), Envoy's bootstrap is the one the chart's sidecar ships
(`envoy_config.render_bootstrap`), and the command prints the URL to curl and the picker's
metrics URL. Ctrl-C or SIGTERM stops Envoy, then the picker; nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import aiohttp

from epp import arguments, logfmt
from sluice.gateway import local

_PROG = "sluice gateway"
_MODEL_PLACEHOLDER = "<model>"


def build_parser() -> arguments.OneLineParser:
    p = arguments.OneLineParser(prog=_PROG, description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", default="", help="model servers: ip:port,ip:port")
    p.add_argument(
        "--manifests",
        nargs="+",
        type=Path,
        default=[],
        metavar="FILE",
        help="YAML files with Pods, InferencePool, InferenceObjective ... (watched)",
    )
    p.add_argument("--pool-name", default=None, help="the InferencePool to serve (manifests)")
    p.add_argument("--pool-namespace", default="default")
    p.add_argument("--config-file", type=Path, default=None, help="EndpointPickerConfig YAML")
    p.add_argument(
        "--flow-control",
        action="store_true",
        help="workload-aware flow control with the shipped preset (objectives 'critical' "
        "and 'sheddable'); instead of --config-file",
    )
    p.add_argument("--host", default="127.0.0.1", help="address Envoy listens on")
    p.add_argument("--port", type=arguments.port, default=8081, help="Envoy's port (0 = any)")
    p.add_argument(
        "--metrics-port",
        type=arguments.port,
        default=9090,
        help="the picker's /metrics and workload API port (0 = any)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


async def served_model(gateway: local.RunningGateway) -> str:
    """The first model the first endpoint lists at /v1/models, for the curl line."""
    endpoints = gateway.picker.reconciler.current.endpoints
    if not endpoints:
        return _MODEL_PLACEHOLDER
    timeout = aiohttp.ClientTimeout(total=2)
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError):
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://{endpoints[0].target}/v1/models") as response,
        ):
            return str((await response.json())["data"][0]["id"])
    return _MODEL_PLACEHOLDER


async def serve(options: local.LocalGatewayOptions) -> None:
    stop = local.stop_event()
    async with local.running(options) as gateway:
        model = await served_model(gateway)
        lines = [
            f"Gateway: {gateway.url}",
            f"Picker metrics: {gateway.metrics_url}/metrics",
        ]
        if gateway.flow_control:
            lines.append(f"Workload API: {gateway.metrics_url}/api/v1/workload/<id>/metrics")
        workload = "fraud" if gateway.flow_control else None
        lines += ["Try:", f"  {local.try_command(gateway.url, model, workload)}"]
        print("\n".join(lines), flush=True)
        await stop.wait()
    print(f"{_PROG}: stopped", flush=True)


def main(argv: list[str]) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logfmt.configure(args.verbose)
    try:
        options = local.LocalGatewayOptions(
            endpoints=args.endpoints,
            manifests=tuple(args.manifests),
            pool_name=args.pool_name,
            pool_namespace=args.pool_namespace,
            config_file=args.config_file,
            flow_control=args.flow_control,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
        )
    except ValueError as error:
        p.error(str(error))
    try:
        asyncio.run(serve(options))
    except (RuntimeError, OSError, ValueError) as error:  # EnvoyError, ConfigError among them
        print(f"{_PROG}: {error}", file=sys.stderr)
        return 1
    return 0
