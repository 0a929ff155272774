"""kopf handlers: cluster objects in, datastore inputs and config reloads out.

Every fed kind gets two handlers. An *index* handler hands each added or changed object to
the feed; kopf runs index handlers for every object of every initial list before it lets
any other handler run, which is what tells us the initial state is complete. An *event*
handler sees deletions (index handlers never do) and, for the pool, marks the moment the
picker may turn ready: by the time it runs, every pod of the initial list is in the feed.

Handlers are coroutines so they run on kopf's loop: kopf runs plain functions in a thread
pool, which would cost a thread hop per event during a burst.

Nothing here writes to Pods or InferencePools: event handlers store no progress, add no
finalizers and leave no annotations. The only writes are ``WorkloadClass.status`` (a kind
we own) and Events on the config ConfigMap.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import kopf

from epp_operator import resources, status
from epp_operator.feed import ClusterFeed
from epp_operator.resources import Resource
from epp_operator.resync import Resync
from epp_operator.settings import OperatorOptions

log = logging.getLogger(__name__)


class ConfigSink(Protocol):
    async def reload_config(self, text: str, origin: str) -> str | None:
        """Apply a new EndpointPickerConfig; the validation error, or None when applied."""
        ...


class ReadinessGate:
    """Marks the feed synced once the pool was seen and the config applied."""

    def __init__(self, feed: ClusterFeed, *, needs_config: bool) -> None:
        self._feed = feed
        self._pool_seen = False
        self._config_applied = not needs_config
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def pool_seen(self) -> None:
        self._pool_seen = True
        self._maybe_done()

    def config_applied(self) -> None:
        self._config_applied = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._pool_seen and self._config_applied and not self._done:
            self._done = True
            self._feed.mark_synced()
            log.info("initial state synced: pool, pods and config")


def kopf_settings(options: OperatorOptions) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = options.watch_server_timeout_s
    settings.watching.client_timeout = options.watch_client_timeout_s
    settings.watching.connect_timeout = options.watch_connect_timeout_s
    settings.watching.inactivity_timeout = options.watch_inactivity_timeout_s
    settings.watching.reconnect_backoff = options.reconnect_backoff_s
    settings.networking.request_timeout = options.request_timeout_s
    settings.posting.enabled = options.event_level is not None
    settings.posting.level = options.event_level or logging.INFO
    settings.posting.reporting_component = "sluice"
    settings.peering.name = options.peering_name
    # Watch only what exists at startup: dynamic discovery would need cluster-wide
    # permissions on namespaces and CRDs that a namespace-scoped operator does not have.
    settings.scanning.disabled = True
    if options.config_configmap:
        settings.watching.field_selectors["v1", "configmaps"] = (
            f"metadata.name={options.config_configmap}"
        )
    return settings


def build_registry(
    options: OperatorOptions, feed: ClusterFeed, config: ConfigSink, resync: Resync
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    gate = ReadinessGate(feed, needs_config=options.config_configmap is not None)
    for resource in resources.FED:
        _feed_handlers(registry, options, feed, gate, resync, resource)

    @kopf.on.startup(registry=registry)
    async def start_resync(**_: Any) -> None:
        if options.resync_period_s:
            resync.start_timer(options.resync_period_s)

    @kopf.on.cleanup(registry=registry)
    async def stop_resync(**_: Any) -> None:
        await resync.close()

    del start_resync, stop_resync
    _workload_class_status(registry, options)
    if options.config_configmap:
        _config_handlers(registry, options, config, gate)
    _login(registry, options)
    return registry


def _feed_handlers(
    registry: kopf.OperatorRegistry,
    options: OperatorOptions,
    feed: ClusterFeed,
    gate: ReadinessGate,
    resync: Resync,
    resource: Resource,
) -> None:
    group, version, plural = resource.group, resource.version, resource.plural

    def in_pool_namespace(namespace: str | None, **_: Any) -> bool:
        return namespace == options.pool_namespace

    # Pods of other namespaces can never be endpoints of this pool (clusterwide mode).
    when = in_pool_namespace if resource is resources.POD else None

    @kopf.index(group, version, plural, id=f"feed-{plural}", when=when, registry=registry)
    async def index(body: Any, **_: Any) -> None:
        feed.upsert(resources.to_object(resource, body))

    @kopf.on.event(group, version, plural, id=f"watch-{plural}", when=when, registry=registry)
    async def event(type: str | None, name: str, namespace: str | None, **_: Any) -> None:
        if type == "DELETED":
            feed.remove(resource.kind, namespace or "default", name)
        elif type is None and gate.done:
            # A listing after the initial one: kopf reconnected and re-listed. What was
            # deleted meanwhile produced no event; let a fresh list find it.
            resync.request()
        if (
            type != "DELETED"
            and resource.kind == "InferencePool"
            and name == options.pool_name
            and namespace == options.pool_namespace
        ):
            gate.pool_seen()

    del index, event  # registered; the names only exist for kopf's handler ids


def _workload_class_status(registry: kopf.OperatorRegistry, options: OperatorOptions) -> None:
    wc = resources.WORKLOAD_CLASS

    @kopf.on.event(
        group=wc.group, version=wc.version, plural=wc.plural, id="status", registry=registry
    )
    async def workload_class_status(type: str | None, body: Any, patch: Any, **_: Any) -> None:
        if type == "DELETED":
            return
        obj = resources.plain(body)
        wanted = status.workload_class_status(obj, options.pool_name)
        if wanted is not None and status.needs_update(obj, wanted):
            patch["status"] = wanted

    del workload_class_status


def _config_handlers(
    registry: kopf.OperatorRegistry,
    options: OperatorOptions,
    config: ConfigSink,
    gate: ReadinessGate,
) -> None:
    cm = resources.CONFIG_MAP
    key = options.config_key
    seen: list[str] = []  # the last text handled, applied or rejected (replays post nothing)

    def ours(name: str, namespace: str | None, **_: Any) -> bool:
        return name == options.config_configmap and namespace == options.pool_namespace

    @kopf.index(cm.version, cm.plural, id="config-listed", when=ours, registry=registry)
    async def listed(**_: Any) -> None:
        return None  # only here so the initial list gates readiness like the others

    @kopf.on.event(cm.version, cm.plural, id="config", when=ours, registry=registry)
    async def config_changed(
        type: str | None, body: Any, name: str, namespace: str | None, **_: Any
    ) -> None:
        origin = f"ConfigMap {namespace}/{name}"
        if type == "DELETED":
            log.warning("%s was deleted; the current picker config stays in force", origin)
            return
        data = body.get("data") or {}
        text = data.get(key)
        marker = text if isinstance(text, str) else f"\0missing {sorted(data)}"
        if seen and seen[-1] == marker:
            return
        seen[:] = [marker]
        if not isinstance(text, str):
            keys = ", ".join(sorted(data)) or "none"
            error: str | None = f"{origin} has no key {key!r} (its keys: {keys})"
        else:
            error = await config.reload_config(text, f"{origin} key {key}")
        if error is not None:
            # The picker logged the validation error already; this one is for kubectl.
            kopf.warn(
                body,
                reason="ConfigRejected",
                message=f"{error} (the previous config stays in force)",
            )
            return
        log.info("picker config reloaded from %s", origin)
        kopf.info(body, reason="ConfigApplied", message=f"picker config reloaded from key {key}")
        gate.config_applied()

    del listed, config_changed


def _login(registry: kopf.OperatorRegistry, options: OperatorOptions) -> None:
    if options.api_server is not None:
        server = options.api_server

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> Any:
            return kopf.ConnectionInfo(
                server=server, insecure=True, default_namespace=options.pool_namespace
            )

        del login
        return
    kopf.on.login(registry=registry)(kopf.login_with_service_account)
    kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)
