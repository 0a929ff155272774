"""A gateway on this machine: the picker in this process and a real Envoy in front of it.

`sluice gateway` runs it in front of model servers the user already runs; `sluice demo`
runs it in front of simulators. Envoy's bootstrap is `envoy_config.render_bootstrap` in
picker mode, the one the chart's sidecar ships, so what works here works there.

The picker starts first (Envoy health-checks it and would fail requests until it is up)
and stops last. The picker's gRPC ports are chosen by the kernel; the metrics port is the
caller's (0: chosen by the kernel) because people type it into curl.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from epp.picker import Picker, PickerOptions
from sluice import presets
from sluice.gateway import settings
from sluice.gateway.envoy_process import EnvoyProcess


@dataclass(frozen=True, slots=True)
class LocalGatewayOptions:
    endpoints: str = ""  # ip:port,...
    manifests: tuple[Path, ...] = ()
    pool_name: str | None = None
    pool_namespace: str = "default"
    config_file: Path | None = None
    flow_control: bool = False  # the shipped preset: sluice/presets/
    host: str = "127.0.0.1"  # where Envoy listens
    port: int = 8081
    metrics_port: int = 0
    refresh_metrics_interval_s: float = 0.05

    def __post_init__(self) -> None:
        if not self.endpoints and not self.manifests:
            raise ValueError("no model servers: give --endpoints ip:port,... or --manifests FILE")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"--host {self.host!r} is not an IP address") from None
        if self.flow_control and self.config_file is not None:
            raise ValueError(
                "--flow-control and --config-file both choose the picker's config; put "
                "'featureGates: [flowControl]' in your file, or drop one of them"
            )


@dataclass(frozen=True, slots=True)
class RunningGateway:
    picker: Picker
    envoy: EnvoyProcess

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.picker.metrics_port}"

    @property
    def flow_control(self) -> bool:
        return self.picker.flow_controller is not None


def picker_options(options: LocalGatewayOptions) -> PickerOptions:
    config_file = presets.FLOW_CONTROL_CONFIG if options.flow_control else options.config_file
    manifests = options.manifests + ((presets.OBJECTIVES,) if options.flow_control else ())
    return PickerOptions(
        host="127.0.0.1",
        grpc_port=0,
        health_port=0,
        metrics_port=options.metrics_port,
        endpoints=options.endpoints,
        manifests=manifests,
        pool_name=options.pool_name,
        pool_namespace=options.pool_namespace,
        config_file=config_file,
        refresh_metrics_interval_s=options.refresh_metrics_interval_s,
        secure_serving=False,  # Envoy reaches it over loopback
        shutdown_grace_s=2.0,
    )


def check_port_free(host: str, port: int, flag: str) -> None:
    """Fail with one line naming `flag` when `port` is taken (0 is always free)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = "already in use" if error.errno == errno.EADDRINUSE else error.strerror
            raise ValueError(f"{flag} {port}: {host}:{port} is {reason}") from None


@contextlib.asynccontextmanager
async def running(options: LocalGatewayOptions) -> AsyncIterator[RunningGateway]:
    """The picker and Envoy, up and ready, for the lifetime of the block."""
    check_port_free(options.host, options.port, "--port")
    check_port_free("127.0.0.1", options.metrics_port, "--metrics-port")
    picker = Picker(picker_options(options))
    try:
        await picker.start()
        fixed = () if options.manifests else tuple(options.endpoints.split(","))
        gateway = settings.GatewayOptions(
            mode=settings.GatewayMode.PICKER,
            listen_host=options.host,
            listen_port=options.port,
            picker_port=picker.grpc_port,
            # A fixed endpoint list is every endpoint the picker may choose, so Envoy can
            # retry a refused connection on the picker's fallbacks, then on the others.
            # Manifests may add endpoints Envoy would not know: address the one chosen.
            destination_cluster=(
                settings.DestinationCluster.OVERRIDE_HOST
                if fixed
                else settings.DestinationCluster.ORIGINAL_DST
            ),
            backends=fixed,
        )
        async with EnvoyProcess(gateway) as envoy:
            yield RunningGateway(picker, envoy)
    finally:
        await picker.stop()


def stop_event() -> asyncio.Event:
    """An event set by SIGINT (Ctrl-C) or SIGTERM, on the running loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


def try_command(url: str, model: str, workload: str | None = None) -> str:
    """A curl line a user can paste to send one completion through the gateway."""
    body = f'{{"model": "{model}", "prompt": "Say hello", "max_tokens": 16}}'
    context = (
        f'-H \'X-Workload-Context: {{"workload_id":"{workload}","criticality":5}}\' '
        if workload
        else ""
    )
    return f"curl -si {url}/v1/completions -H 'content-type: application/json' {context}-d '{body}'"
