"""`sluice picker`: wires sources, data layer, scheduler and servers into one process.

:class:`Picker` is also what the operator embeds: it takes a reconciler the operator
feeds, instead of manifest files.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from epp import logfmt, metrics
from epp.config import loader, quantities
from epp.config import watch as config_watch
from epp.datalayer import collector as collecting
from epp.datalayer.endpoint_metrics import EndpointMetrics, MetricsStore
from epp.datastore import sources
from epp.datastore.reconciler import Reconciler
from epp.datastore.snapshot import Snapshot
from epp.extproc.server import PickerServer, load_or_create_tls
from epp.flowcontrol import controller as flow_controller
from epp.flowcontrol import settings as flow_settings
from epp.flowcontrol.registry import WorkloadView
from epp.metrics_server import MetricsServer
from epp.requestcontrol.director import Director
from epp.requests.parsers import PARSERS, BodyParser

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PickerOptions:
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    health_port: int = 9003
    metrics_port: int = 9090
    endpoints: str = ""
    manifests: tuple[Path, ...] = ()
    pool_name: str | None = None
    pool_namespace: str = "default"
    config_file: Path | None = None
    config_text: str | None = None
    refresh_metrics_interval_s: float = 0.05
    metrics_staleness_threshold_s: float = 2.0
    secure_serving: bool = True
    cert_path: Path | None = None
    max_request_body_bytes: int = 16 * 1024 * 1024
    manifest_poll_interval_s: float = 0.5
    config_poll_interval_s: float = 0.5
    pool_gauge_interval_s: float = 1.0
    shutdown_grace_s: float = 10.0


class Picker:
    """The endpoint picker with everything it needs, started and stopped as one."""

    def __init__(self, options: PickerOptions, reconciler: Reconciler | None = None) -> None:
        self.options = options
        static = sources.parse_endpoints(options.endpoints) if options.endpoints else []
        self.reconciler = reconciler or Reconciler(
            pool_name=options.pool_name,
            pool_namespace=options.pool_namespace,
            static_endpoints=static,
        )
        self.manifests = (
            sources.ManifestWatcher(
                self.reconciler, options.manifests, options.manifest_poll_interval_s
            )
            if options.manifests
            else None
        )
        config_text = _config_text(options)
        self.config = loader.load_config(config_text)
        self.metrics_store = MetricsStore()
        flow = flow_settings.from_config(self.config)
        self.flow_controller = (
            flow_controller.FlowController(flow, pool=self._pool_metrics) if flow else None
        )
        self.collector = collecting.Collector(
            self.metrics_store,
            self.config.data_sources,
            interval_s=options.refresh_metrics_interval_s,
        )
        self.config_watcher = (
            config_watch.ConfigFileWatcher(
                options.config_file,
                self.reload_config,
                poll_interval_s=options.config_poll_interval_s,
                loaded_text=config_text,
            )
            if options.config_file is not None and options.config_text is None
            else None
        )
        self.director = Director(
            snapshot=lambda: self.reconciler.current,
            metrics_store=self.metrics_store,
            scheduler=lambda: self.config.scheduler,
            parser=lambda: self._parser,
            staleness_threshold_s=options.metrics_staleness_threshold_s,
            flow_control=lambda: self.flow_controller,
        )
        self._parser: BodyParser = PARSERS[self.config.parser_type]()
        tls = load_or_create_tls(options.cert_path) if options.secure_serving else None
        self.server = PickerServer(
            self.director,
            host=options.host,
            grpc_port=options.grpc_port,
            health_port=options.health_port,
            tls=tls,
            max_body_bytes=options.max_request_body_bytes,
        )
        self.metrics_server = MetricsServer(
            options.host, options.metrics_port, workloads=self._workload_view
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self.reconciler.subscribe(self._on_snapshot)
        if self.manifests is not None:
            self.manifests.load()
        await self.collector.start()
        if self.flow_controller is not None:
            self.flow_controller.start()
        self.collector.update_endpoints(self.reconciler.current.endpoints)
        await self.server.start()
        await self.metrics_server.start()
        if self.manifests is not None:
            self._tasks.append(asyncio.create_task(self.manifests.run(), name="manifest-watch"))
        if self.config_watcher is not None:
            self._tasks.append(
                asyncio.create_task(self.config_watcher.run(), name="config-file-watch")
            )
        self._tasks.append(asyncio.create_task(self._pool_gauges(), name="pool-gauges"))
        if self.options.manifests or self.options.endpoints or self.options.pool_name is None:
            # Standalone sources are complete once loaded; the operator marks its own sync.
            self.reconciler.mark_synced()
        await self._apply_readiness(self.reconciler.current)

    async def stop(self) -> None:
        await self.server.stop(self.options.shutdown_grace_s)
        if self.flow_controller is not None:
            await self.flow_controller.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.collector.stop()
        await self.metrics_server.stop()

    def reload_config(self, text: str | None, origin: str) -> None:
        """Validate `text` (None/empty: the default config) and put it in force for new
        requests; requests in flight keep the scheduler they were scheduled with. Plugins
        with state keep it when unchanged (see `loader`). Raises ConfigError and keeps the
        running config when `text` is invalid. Call on the picker's event loop."""
        old = self.config
        try:
            new = loader.load_config(text, previous=old)
            parser = PARSERS[new.parser_type]()
            try:
                flow = flow_settings.from_config(new)
            except ValueError as error:
                raise loader.ConfigError(str(error)) from None
        except loader.ConfigError as error:
            metrics.config_reload_total.labels("failure").inc()
            log.error("config from %s rejected, the previous one stays in force: %s", origin, error)
            raise
        self._parser = parser
        self.config = new  # one reference swap: each request reads it once
        if new.data_sources is not old.data_sources:
            self.collector.replace_sources(new.data_sources)
        new.retain_endpoints(e.key for e in self.reconciler.current.endpoints)
        self._apply_flow_control(flow)
        metrics.config_reload_total.labels("success").inc()
        log.info(
            "config from %s in force: %d profile(s), %d plugin(s)%s",
            origin,
            len(new.scheduler.profiles),
            len(new.plugins),
            ", data layer changed" if new.data_sources is not old.data_sources else "",
        )

    @property
    def grpc_port(self) -> int:
        return self.server.grpc_port

    @property
    def health_port(self) -> int:
        return self.server.health_port

    @property
    def metrics_port(self) -> int:
        return self.metrics_server.port

    def _apply_flow_control(self, flow: flow_settings.FlowControlSettings | None) -> None:
        """Reload: queued requests stay queued under the new policies; switching the gate
        off lets them all go; switching it on starts a controller."""
        current = self.flow_controller
        if flow is not None and current is not None:
            current.reconfigure(flow)
        elif flow is not None:
            self.flow_controller = flow_controller.FlowController(flow, pool=self._pool_metrics)
            self.flow_controller.start()
        elif current is not None:
            self.flow_controller = None
            current.let_all_go()
            # Admitted requests still release into `current`; only its tasks stop.
            self._tasks.append(asyncio.create_task(current.stop(), name="flow-control-stop"))

    def _pool_metrics(self) -> list[EndpointMetrics]:
        get = self.metrics_store.get
        return [get(e.key) for e in self.reconciler.current.endpoints]

    def _workload_view(self, workload_id: str) -> WorkloadView | None:
        if self.flow_controller is None:
            return None
        return self.flow_controller.workload_view(workload_id)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        self.collector.update_endpoints(snapshot.endpoints)
        self.config.retain_endpoints([e.key for e in snapshot.endpoints])
        if snapshot.synced and not self._ready.is_set():
            asyncio.get_running_loop().create_task(self._apply_readiness(snapshot))

    async def _apply_readiness(self, snapshot: Snapshot) -> None:
        if snapshot.synced and not self._ready.is_set():
            self._ready.set()
            await self.server.set_ready(True)

    async def _pool_gauges(self) -> None:
        while True:
            snapshot = self.reconciler.current
            name = snapshot.pool.name if snapshot.pool else "static"
            summary = collecting.pool_summary(
                self.metrics_store,
                snapshot.endpoints,
                staleness_s=self.options.metrics_staleness_threshold_s,
            )
            metrics.pool_ready_pods.labels(name).set(len({e.pod_name for e in snapshot.endpoints}))
            metrics.pool_average_kv_cache_utilization.labels(name).set(
                summary.average_kv_cache_usage
            )
            metrics.pool_average_queue_size.labels(name).set(summary.average_queue_size)
            await asyncio.sleep(self.options.pool_gauge_interval_s)


def _config_text(options: PickerOptions) -> str | None:
    if options.config_text is not None:
        return options.config_text
    if options.config_file is not None:
        try:
            return options.config_file.read_text(encoding="utf-8")
        except OSError as error:
            raise loader.ConfigError(
                f"--config-file {options.config_file}: {error.strerror or error}"
            ) from error
    return None


# ---- command line ---------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _duration(text: str) -> float:
    try:
        return quantities.parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line that names the problem, as the project's rules ask.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_argument_parser(prog: str = "sluice picker") -> argparse.ArgumentParser:
    p = _ArgumentParser(prog=prog, description="Endpoint picker for LLM inference (no Kubernetes).")
    p.add_argument("--endpoints", default="", help="static endpoints: ip:port,ip:port")
    p.add_argument(
        "--manifests",
        nargs="+",
        type=Path,
        default=[],
        help="YAML files with Pods, InferencePool, ...",
    )
    p.add_argument("--pool-name", default=None)
    p.add_argument("--pool-namespace", default="default")
    p.add_argument("--config-file", type=Path, default=None, help="EndpointPickerConfig YAML")
    p.add_argument("--config-text", default=None, help="EndpointPickerConfig YAML inline")
    p.add_argument(
        "--validate-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="check an EndpointPickerConfig file, print one line and exit (0 valid, 1 not)",
    )
    p.add_argument("--grpc-port", type=int, default=9002)
    p.add_argument("--grpc-health-port", type=int, default=9003)
    p.add_argument("--metrics-port", type=int, default=9090)
    p.add_argument("--host", default="0.0.0.0", help="address to bind the servers to")
    p.add_argument("--refresh-metrics-interval", type=_duration, default=0.05)
    p.add_argument("--metrics-staleness-threshold", type=_duration, default=2.0)
    p.add_argument("--secure-serving", type=parse_bool, nargs="?", const=True, default=True)
    p.add_argument(
        "--cert-path", type=Path, default=None, help="directory with tls.crt and tls.key"
    )
    p.add_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def options_from_args(args: argparse.Namespace) -> PickerOptions:
    return PickerOptions(
        host=args.host,
        grpc_port=args.grpc_port,
        health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        endpoints=args.endpoints,
        manifests=tuple(args.manifests),
        pool_name=args.pool_name,
        pool_namespace=args.pool_namespace,
        config_file=args.config_file,
        config_text=args.config_text,
        refresh_metrics_interval_s=args.refresh_metrics_interval,
        metrics_staleness_threshold_s=args.metrics_staleness_threshold,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        max_request_body_bytes=args.max_request_body_bytes,
    )


def configure_logging(verbosity: int) -> None:
    logfmt.configure(verbosity)


def tune_garbage_collector() -> None:
    """Every request allocates thousands of short-lived objects (protobuf messages, gRPC
    frames) and almost no cycles; the default gen-0 threshold runs a collection every few
    requests. Freeze what start-up built and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def serve(picker: Picker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await picker.start()
    tune_garbage_collector()
    print(
        f"sluice picker: ext_proc on :{picker.grpc_port}, health on :{picker.health_port}, "
        f"metrics on :{picker.metrics_port}",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    await picker.stop()


def validate_config_file(path: Path) -> tuple[bool, str]:
    """(valid, one line) for `--validate-config`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return False, f"{path}: cannot read: {getattr(error, 'strerror', None) or error}"
    try:
        config = loader.load_config(text)
        flow_settings.from_config(config)  # the same checks start-up and reload make
    except (loader.ConfigError, ValueError) as error:
        return False, f"{path}: {error}"
    profiles = ", ".join(config.scheduler.profiles)
    return True, f"{path}: valid ({len(config.plugins)} plugins; profiles: {profiles})"


def main(argv: list[str]) -> int:
    args = build_argument_parser().parse_args(argv)
    if args.validate_config is not None:
        valid, line = validate_config_file(args.validate_config)
        print(f"sluice picker: {line}", file=sys.stdout if valid else sys.stderr)
        return 0 if valid else 1
    configure_logging(args.verbose)
    try:
        picker = Picker(options_from_args(args))
        asyncio.run(serve(picker))
    except (sources.SourceError, loader.ConfigError, ValueError) as error:
        print(f"sluice picker: {error}", file=sys.stderr)
        return 1
    return 0
