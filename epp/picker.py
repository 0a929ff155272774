"""The picker's composition root: sources, data layer, config, flow control, the request
path and the servers, started and stopped as one.

`Picker` is what `sluice picker` runs (`epp.cli`) and what the operator embeds: the
operator passes a reconciler it feeds from the cluster instead of manifest files.

A config becomes a `RequestPipeline` here: the loader builds everything an
`EndpointPickerConfig` says; this module binds the parts that live longer than one config
(the flow controller and its queues, the collector's sources) and swaps the pipeline in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from epp import metrics
from epp.config import loader
from epp.config import watch as config_watch
from epp.datalayer import collector as collecting
from epp.datalayer.endpoint_metrics import EndpointLoad, MetricsStore
from epp.datastore import sources
from epp.datastore.reconciler import Reconciler
from epp.datastore.snapshot import Snapshot
from epp.extproc.server import PickerServer, load_or_create_tls
from epp.flowcontrol import controller as flow_controller
from epp.flowcontrol.registry import WorkloadView
from epp.metrics_server import MetricsServer
from epp.requestcontrol import admission
from epp.requestcontrol.director import Director, RequestPipeline
from epp.requestcontrol.inflight import InFlightTracker
from epp.requestcontrol.interfaces import AdmissionController
from epp.requestcontrol.unanswered import UnansweredRequests

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
    # Share of responses whose body the picker reads (timing, usage) when nothing else
    # needs it: the latency metrics' and the latency predictor's sample.
    response_sample_rate: float = 0.01
    request_body_timeout_s: float = 30.0  # headers to end of body; 0: none
    max_body_bytes_in_flight: int = 256 * 1024 * 1024  # all requests' bodies together
    # A request ending unanswered (no response headers, or Envoy's 504) after this long
    # holds its endpoint out of routing for a while; 0: off.
    response_header_timeout_s: float = 30.0
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
        try:
            self.config = loader.load_config(config_text)
        except loader.ConfigError as error:
            # Name the source: a start-up error shows the flag and file it came from.
            origin = _config_origin(options)
            raise loader.ConfigError(f"{origin}: {error}" if origin else str(error)) from None
        self.metrics_store = MetricsStore()
        # Model names keep their own metric label once the pool serves them (cardinality).
        self.metrics_store.on_models_changed = metrics.known_models.mark_stale
        metrics.known_models.source = self._known_models
        self.flow_controller: flow_controller.FlowController | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._ready = asyncio.Event()
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
            datastore=self.reconciler,
            metrics_store=self.metrics_store,
            pipeline=self._pipeline(self.config),
            staleness_threshold_s=options.metrics_staleness_threshold_s,
            response_sample_rate=options.response_sample_rate,
        )
        if options.response_header_timeout_s > 0:
            self.director.unanswered = UnansweredRequests(
                self.metrics_store, options.response_header_timeout_s
            )
        tls = load_or_create_tls(options.cert_path) if options.secure_serving else None
        self.server = PickerServer(
            self.director,
            host=options.host,
            grpc_port=options.grpc_port,
            health_port=options.health_port,
            tls=tls,
            max_body_bytes=options.max_request_body_bytes,
            max_body_bytes_in_flight=options.max_body_bytes_in_flight,
            body_timeout_s=options.request_body_timeout_s,
        )
        self.metrics_server = MetricsServer(
            options.host,
            options.metrics_port,
            workloads=self._workload_view,
            before_render=self.refresh_pool_gauges,
        )

    async def start(self) -> None:
        self.reconciler.subscribe(self._on_snapshot)
        if self.manifests is not None:
            self.manifests.load()
        await self.collector.start()
        self._started = True
        if self.flow_controller is not None:
            self.flow_controller.start()  # created with the first pipeline, before a loop ran
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
        requests; requests in flight keep the pipeline they started with. Plugins
        with state keep it when unchanged (see `loader`). Raises ConfigError and keeps the
        running config when `text` is invalid. Call on the picker's event loop."""
        old = self.config
        try:
            new = loader.load_config(text, previous=old)
        except loader.ConfigError as error:
            metrics.config_reload_total.labels("failure").inc()
            log.error("config from %s rejected, the previous one stays in force: %s", origin, error)
            raise
        self.config = new
        # One reference swap: a request takes the pipeline once, at its start.
        self.director.pipeline = self._pipeline(new)
        if new.data_sources is not old.data_sources:
            self.collector.replace_sources(new.data_sources)
        new.retain_endpoints(e.key for e in self.reconciler.current.endpoints)
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

    @property
    def in_flight(self) -> InFlightTracker:
        """Requests routed and not yet ended, per endpoint."""
        return self.config.in_flight

    def _pipeline(self, config: loader.PickerConfig) -> RequestPipeline:
        return RequestPipeline(
            parser=config.parser,
            admission=self._admission(config),
            scheduler=config.scheduler,
            lifecycle=config.lifecycle,
            default_criticality=config.default_criticality,
        )

    def _admission(self, config: loader.PickerConfig) -> AdmissionController:
        """Bind the config's admission to the flow controller, which outlives configs:
        queued requests stay queued under new policies; switching the gate off lets them
        all go; switching it on starts a controller."""
        flow, current = config.flow_control, self.flow_controller
        if flow is None:
            if current is not None:
                self.flow_controller = None
                current.let_all_go()
                # Admitted requests still release into `current`; only its tasks stop.
                self._tasks.append(asyncio.create_task(current.stop(), name="flow-control-stop"))
            return admission.SaturationShedding(config.saturation_detector, self._pool_metrics)
        if current is not None:
            current.reconfigure(flow)
        else:
            current = self.flow_controller = flow_controller.FlowController(
                flow, pool=self._pool_metrics
            )
            if self._started:
                current.start()
        return admission.FlowControlAdmission(current)

    def _pool_metrics(self) -> list[EndpointLoad]:
        load = self.metrics_store.load
        return [load(e.key) for e in self.reconciler.current.endpoints]

    def _workload_view(self, workload_id: str) -> WorkloadView | None:
        if self.flow_controller is None:
            return None
        return self.flow_controller.workload_view(workload_id)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        metrics.known_models.mark_stale()
        self.collector.update_endpoints(snapshot.endpoints)
        self.config.retain_endpoints([e.key for e in snapshot.endpoints])
        if snapshot.synced and not self._ready.is_set():
            asyncio.get_running_loop().create_task(self._apply_readiness(snapshot))

    async def _apply_readiness(self, snapshot: Snapshot) -> None:
        if snapshot.synced and not self._ready.is_set():
            self._ready.set()
            await self.server.set_ready(True)

    def refresh_pool_gauges(self) -> None:
        """Pool gauges, the pool's saturation and the models that keep their own metric
        label, recomputed from what the data layer holds now (also before each /metrics
        render, so an idle pool's gauges are not left at their last request's values)."""
        snapshot = self.reconciler.current
        name = snapshot.pool.name if snapshot.pool else "static"
        summary = collecting.pool_summary(
            self.metrics_store,
            snapshot.endpoints,
            staleness_s=self.options.metrics_staleness_threshold_s,
        )
        metrics.pool_ready_pods.labels(name).set(len({e.pod_name for e in snapshot.endpoints}))
        metrics.pool_average_kv_cache_utilization.labels(name).set(summary.average_kv_cache_usage)
        metrics.pool_average_queue_size.labels(name).set(summary.average_queue_size)
        if self.flow_controller is not None:
            self.flow_controller.publish_saturation()
        metrics.known_models.replace(self._known_models())

    def _known_models(self) -> set[str]:
        """Models whose names keep their own metric label: what the pool's servers report
        serving (model_name labels, LoRA adapters) and what rewrites name."""
        snapshot, store = self.reconciler.current, self.metrics_store
        names: set[str] = set()
        for endpoint in snapshot.endpoints:
            m = store.get(endpoint.key)
            names |= m.served_models
            names |= m.running_adapters
            names |= m.waiting_adapters
            names |= m.served_adapters  # an adapter between its requests is still served
        for model, targets in snapshot.rewrites_exact.items():
            names.add(model)
            names.update(target.model for target in targets)
        names.update(target.model for target in snapshot.rewrite_catch_all)
        return names

    async def _pool_gauges(self) -> None:
        while True:
            self.refresh_pool_gauges()
            metrics.remove_idle_series(time.monotonic())
            await asyncio.sleep(self.options.pool_gauge_interval_s)


def _config_text(options: PickerOptions) -> str | None:
    if options.config_text is not None:
        return options.config_text
    if options.config_file is not None:
        try:
            return options.config_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise loader.ConfigError(f"--config-file {options.config_file}: {reason}") from error
    return None


def _config_origin(options: PickerOptions) -> str:
    if options.config_text is not None:
        return "--config-text"
    if options.config_file is not None:
        return f"--config-file {options.config_file}"
    return ""
