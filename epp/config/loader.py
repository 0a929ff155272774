"""Turn an `EndpointPickerConfig` into everything the picker runs with.

`load_config(text)` validates everything before anything is used: a config that fails
raises `ConfigError` and the caller keeps the config it had. Built from one document, in
order:

* the plugins (`plugin_set`): every declared plugin's type is registered and its
  parameters are valid for that plugin;
* the scheduling profiles and handler (`profiles`);
* the data layer (`data_layer`): sources with their extractors wired, ready for the
  collector; a scorer with a `consumes` set (`metric-scorer`) must read custom metrics
  that some wired extractor `produces`;
* the body parser (`parser:`), the saturation detector and, with the `flowControl` gate,
  the flow-control settings (`flow_control`);
* the request-lifecycle plugins: every plugin that implements a lifecycle extension
  point, plus the built-in `in-flight-tracker`.

Reload: `load_config(text, previous=old)` keeps a stateful plugin (one with a
`same_settings(other) -> bool` method, e.g. the prefix producer and its index) when the new
config has a plugin of the same name and type whose settings are equal, and keeps the
data layer's running instances when its pipeline is unchanged. Requests in flight keep the
pipeline they started with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from epp import parameters
from epp.bodies import parsers
from epp.config import data_layer as data_layer_section
from epp.config import document, flow_control, profiles, registry
from epp.config.document import ConfigError
from epp.config.plugin_set import PluginSet, StatefulPlugin
from epp.datalayer import interfaces as datalayer
from epp.datastore.snapshot import EndpointKey
from epp.flowcontrol.interfaces import SaturationDetector
from epp.flowcontrol.settings import FEATURE_GATE as FLOW_CONTROL_GATE
from epp.flowcontrol.settings import FlowControlSettings
from epp.flowcontrol.workload import DEFAULT_CRITICALITY
from epp.requestcontrol.inflight import InFlightTracker
from epp.requestcontrol.lifecycle import Lifecycle
from epp.scheduling import framework
from epp.slo.predictor import LatencyPredictor
from epp.slo.tracker import SloRequestTracker

__all__ = ["ConfigError", "PickerConfig", "StatefulPlugin", "load_config"]

DEFAULT_PARSER = "openai-parser"
IN_FLIGHT_TRACKER = InFlightTracker.type_name


@dataclass(frozen=True)
class PickerConfig:
    """A validated config: everything built from one `EndpointPickerConfig`."""

    scheduler: framework.Scheduler
    parser: parsers.BodyParser
    lifecycle: Lifecycle
    saturation_detector: SaturationDetector
    in_flight: InFlightTracker
    # Set when the flowControl gate is on.
    flow_control: FlowControlSettings | None = None
    # For requests whose X-Workload-Context claims none (workload-aware policy setting).
    default_criticality: int = DEFAULT_CRITICALITY
    feature_gates: frozenset[str] = frozenset()
    # Every plugin instance by name, declared or created by default.
    plugins: Mapping[str, object] = field(default_factory=dict)
    # How each plugin was asked for: its declaration, or `default <name>` when the loader
    # added it (what `--validate-config` reports).
    plugin_specs: Mapping[str, document.PluginSpec] = field(default_factory=dict)
    # The `dataLayer:` section as written (None: the default pipeline).
    data_layer: Mapping[str, object] | None = None
    # The `parser:` section's pluginRef, and the parser type it resolves to.
    parser_ref: str = DEFAULT_PARSER
    parser_type: str = DEFAULT_PARSER
    # The data layer's sources with their extractors wired, for the collector.
    data_sources: tuple[datalayer.DataSource, ...] = ()
    data_layer_fingerprint: str = ""

    def feature_enabled(self, gate: str) -> bool:
        return gate in self.feature_gates

    def retain_endpoints(self, keys: Iterable[EndpointKey]) -> None:
        """Let plugins with per-endpoint state (the prefix index) forget endpoints that left
        the pool; call it when the endpoint set changes."""
        keep = frozenset(keys)
        for plugin in self.plugins.values():
            retain = getattr(plugin, "retain", None)
            if callable(retain):
                retain(keep)


def load_config(text: str | None, *, previous: PickerConfig | None = None) -> PickerConfig:
    """Validate and build a config; None or empty text gives the default config."""
    doc = document.parse(text)
    plugins = PluginSet(previous.plugins if previous is not None else {})
    scheduler = profiles.build_scheduler(plugins, doc)
    sources, fingerprint = _data_layer(plugins, doc, previous)
    scorers = [w.scorer for p in scheduler.profiles.values() for w in p.scorers]
    data_layer_section.check_consumers(scorers, sources, plugins.where, doc.data_layer_key)
    parser_ref = doc.parser_ref or DEFAULT_PARSER
    parser_type = _parser_type(plugins, parser_ref)
    detector = _saturation_detector(plugins, doc)
    flow = None
    if FLOW_CONTROL_GATE in doc.feature_gates:
        flow = flow_control.settings(doc.flow_control, detector, plugins.instances)
        scheduler = profiles.with_saturation_filter(scheduler, detector)
    _add_trackers(plugins)
    _bind(plugins, doc.data_layer_key)
    in_flight = plugins.default(IN_FLIGHT_TRACKER, IN_FLIGHT_TRACKER)
    assert isinstance(in_flight, InFlightTracker)
    return PickerConfig(
        scheduler=scheduler,
        parser=parsers.PARSERS[parser_type](),
        lifecycle=Lifecycle(plugins.instances.values()),
        saturation_detector=detector,
        in_flight=in_flight,
        flow_control=flow,
        default_criticality=(
            flow.workload.default_criticality if flow is not None else DEFAULT_CRITICALITY
        ),
        feature_gates=doc.feature_gates,
        plugins=MappingProxyType(dict(plugins.instances)),
        plugin_specs=MappingProxyType(dict(plugins.specs)),
        data_layer=doc.data_layer,
        parser_ref=parser_ref,
        parser_type=parser_type,
        data_sources=sources,
        data_layer_fingerprint=fingerprint,
    )


def _add_trackers(plugins: PluginSet) -> None:
    """A latency predictor learns only from a `slo-request-tracker`: give every predictor
    that no declared tracker feeds one with default settings."""
    fed = {p.predictor_name for p in plugins.instances.values() if isinstance(p, SloRequestTracker)}
    for name, plugin in list(plugins.instances.items()):
        if not isinstance(plugin, LatencyPredictor) or name in fed:
            continue
        tracker = SloRequestTracker.type_name
        tracker_name = tracker if name == LatencyPredictor.type_name else f"{name}-tracker"
        plugins.create(
            document.PluginSpec(
                tracker_name, tracker, {"predictorName": name}, f"default {tracker_name}"
            )
        )


def _bind(plugins: PluginSet, doc_key: str) -> None:
    """Plugins that work with another plugin instance (the SLO tracker and profile handler
    with their latency predictor) get it by name through `bind(lookup)`; one named by its
    type and not declared is created with default parameters."""
    for name, plugin in list(plugins.instances.items()):
        bind = getattr(plugin, "bind", None)
        if not callable(bind):
            continue

        def lookup(wanted: str, kind: type, *, user: str = name) -> object:
            found = plugins.instances.get(wanted)
            if found is None and registry.factory(wanted) is not None:
                found = plugins.default(wanted, wanted)
                if data_layer_section.is_extractor(found) or data_layer_section.is_source(found):
                    # Created here it would never be fed: it must be wired in the data layer.
                    del plugins.instances[wanted]
                    raise ConfigError(
                        f"{plugins.where[user]}: {user!r} needs {wanted!r}, which is not wired "
                        f"in {doc_key}; list it under {doc_key}.sources (e.g. extractors of a "
                        "kv-events-data-source)"
                    )
            if found is None:
                hint = parameters.did_you_mean(wanted, plugins.instances)
                raise ConfigError(
                    f"{plugins.where[user]}: {user!r} needs plugin {wanted!r}, which is not "
                    f"declared under plugins{hint}"
                )
            if not isinstance(found, kind):
                raise ConfigError(
                    f"{plugins.where[user]}: {user!r} needs {wanted!r} to be a "
                    f"{getattr(kind, 'type_name', kind.__name__)}, but it is a "
                    f"{getattr(found, 'type_name', '?')}"
                )
            return found

        bind(lookup)


def _saturation_detector(plugins: PluginSet, doc: document.Document) -> SaturationDetector:
    ref = (doc.saturation_detector or {}).get("pluginRef")
    if ref == flow_control.DETECTOR_TYPE and ref not in plugins.instances:
        plugins.default(ref, ref)  # the short form: referenced, not declared
    return flow_control.detector(doc.saturation_detector, plugins.instances)


def _parser_type(plugins: PluginSet, ref: str) -> str:
    """The parser type the `parser:` section selects: a declared parser plugin's type,
    or a parser type named directly (so the default needs no declaration)."""
    plugin = plugins.instances.get(ref)
    if isinstance(plugin, registry.ParserDeclaration):
        return plugin.type_name
    if plugin is not None:
        raise ConfigError(
            f"parser.pluginRef: {ref!r} is a {getattr(plugin, 'type_name', '?')}, not a parser"
        )
    if ref in registry.parser_types():
        return ref
    declared = [
        n for n, p in plugins.instances.items() if isinstance(p, registry.ParserDeclaration)
    ]
    hint = parameters.did_you_mean(ref, [*declared, *registry.parser_types()])
    raise ConfigError(
        f"parser.pluginRef: no parser named {ref!r}{hint}; declare it under plugins or "
        f"name a parser type ({', '.join(registry.parser_types())})"
    )


def _data_layer(
    plugins: PluginSet, doc: document.Document, previous: PickerConfig | None
) -> tuple[tuple[datalayer.DataSource, ...], str]:
    raw, key = doc.data_layer, doc.data_layer_key
    if raw is not None:
        wirings = data_layer_section.parse_section(raw, key)
    else:
        wirings = data_layer_section.DEFAULT_WIRING
    specs: dict[str, document.PluginSpec | None] = {
        name: plugins.specs.get(name) for name in plugins.instances
    }
    fingerprint = data_layer_section.fingerprint(wirings, specs)
    if previous is not None and previous.data_layer_fingerprint == fingerprint:
        # Same pipeline: keep the running instances (connections, extractor state).
        for source in previous.data_sources:
            plugins.instances[source.name] = source
            for extractor in source.extractors:
                plugins.instances[extractor.name] = extractor
        return previous.data_sources, fingerprint
    built = data_layer_section.build(
        wirings,
        plugins.instances,
        plugins.where,
        lambda name: _default_data_layer_plugin(plugins, name),
    )
    return built, fingerprint


def _default_data_layer_plugin(plugins: PluginSet, name: str) -> object | None:
    if registry.factory(name) is None:
        return None
    plugin = plugins.default(name, name)
    is_data = data_layer_section.is_source(plugin) or data_layer_section.is_extractor(plugin)
    if not is_data:
        del plugins.instances[name]  # a scheduling type named here is a mistake; report it
        return None
    return plugin
