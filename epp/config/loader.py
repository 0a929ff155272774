"""Turn an `EndpointPickerConfig` into plugin instances and a ready `Scheduler`.

`load_config(text)` validates everything before anything is used: a config that fails
raises `ConfigError` and the caller keeps the config it had. The rules, beyond the
document's shape (`document`):

* every plugin's type is registered and its parameters are valid for that plugin;
* every `pluginRef` names a declared plugin; a profile holds filters, scorers, data
  producers and at most one picker (none given: `max-score-picker`); `weight` only on
  scorers (default 1);
* a scorer that reads a data producer (`prefix-cache-scorer`) gets that producer in its
  profile; the default `approx-prefix-cache-producer` is created when not declared;
* one profile and no handler: `single-profile-handler`; several profiles need a handler;
* no `schedulingProfiles`: if filters, scorers or pickers are declared, one profile named
  `default` uses them all (weight 1) in declaration order; otherwise the built-in default
  profile runs — `queue-scorer` x2, `kv-cache-utilization-scorer` x2,
  `prefix-cache-scorer` x3 (with `approx-prefix-cache-producer`), `max-score-picker`,
  `single-profile-handler` — using any declared plugin whose name matches one of those
  (so declaring `approx-prefix-cache-producer` with parameters tunes the default).

Data layer: see `epp.config.data_layer`; `PickerConfig.data_sources` are wired and ready
for the collector. A scorer with a `consumes` set (`metric-scorer`) must read custom
metrics that some wired extractor `produces`.

Also built here: the body parser (`parser:`), the saturation detector and, with the
`flowControl` gate, the flow-control settings (see `epp.config.flow_control`), and the
request-lifecycle plugins: every plugin that implements a lifecycle extension point, plus
the built-in `in-flight-tracker`. A saturation detector named in a profile runs there as
a filter.

Reload: `load_config(text, previous=old)` keeps a stateful plugin (one with a
`same_settings(other) -> bool` method, e.g. the prefix producer and its index) when the new
config has a plugin of the same name and type whose settings are equal: the old instance
is used in the new scheduler. In-flight requests keep using the old scheduler they hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, cast, runtime_checkable

from epp import parameters
from epp.bodies import parsers
from epp.config import data_layer as data_layer_section
from epp.config import document, flow_control, registry
from epp.config.document import ConfigError
from epp.datalayer import interfaces as datalayer
from epp.datastore.snapshot import EndpointKey
from epp.flowcontrol.interfaces import SaturationDetector
from epp.flowcontrol.settings import FEATURE_GATE as FLOW_CONTROL_GATE
from epp.flowcontrol.settings import FlowControlSettings
from epp.requestcontrol.inflight import InFlightTracker
from epp.requestcontrol.lifecycle import Lifecycle
from epp.scheduling import framework
from epp.scheduling.interfaces import (
    DataProducer,
    Filter,
    Picker,
    ProfileHandler,
    Scorer,
)
from epp.scheduling.plugins import saturation_filter

__all__ = ["ConfigError", "PickerConfig", "load_config"]

DEFAULT_PROFILE = "default"
DEFAULT_PICKER = "max-score-picker"
DEFAULT_HANDLER = "single-profile-handler"
DEFAULT_PARSER = "openai-parser"
DEFAULT_PREFIX_PRODUCER = "approx-prefix-cache-producer"
IN_FLIGHT_TRACKER = InFlightTracker.type_name
# (plugin name = type, weight) of the built-in default profile's scorers.
DEFAULT_SCORERS = (
    ("queue-scorer", 2.0),
    ("kv-cache-utilization-scorer", 2.0),
    ("prefix-cache-scorer", 3.0),
)


@runtime_checkable
class StatefulPlugin(Protocol):
    """A plugin whose instance carries learned state worth keeping across reloads."""

    def same_settings(self, other: object) -> bool: ...


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
    feature_gates: frozenset[str] = frozenset()
    # Every plugin instance by name, declared or created by default.
    plugins: Mapping[str, object] = field(default_factory=dict)
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
    builder = _Builder(doc, previous)
    scheduler = builder.build()
    sources, fingerprint = builder.build_data_layer(previous)
    builder.check_consumed_metrics(scheduler, sources)
    parser_ref = doc.parser_ref or DEFAULT_PARSER
    parser_type = builder.parser_type(parser_ref)
    detector_ref = (doc.saturation_detector or {}).get("pluginRef")
    if detector_ref == flow_control.DETECTOR_TYPE and detector_ref not in builder.instances:
        builder._default(detector_ref, detector_ref)  # DESIGN's short form, undeclared
    detector = flow_control.detector(doc.saturation_detector, builder.instances)
    flow = (
        flow_control.settings(doc.flow_control, detector, builder.instances)
        if FLOW_CONTROL_GATE in doc.feature_gates
        else None
    )
    in_flight = builder._default(IN_FLIGHT_TRACKER, IN_FLIGHT_TRACKER)
    assert isinstance(in_flight, InFlightTracker)
    return PickerConfig(
        scheduler=scheduler,
        parser=parsers.PARSERS[parser_type](),
        lifecycle=Lifecycle(builder.instances.values()),
        saturation_detector=detector,
        in_flight=in_flight,
        flow_control=flow,
        feature_gates=doc.feature_gates,
        plugins=MappingProxyType(dict(builder.instances)),
        data_layer=doc.data_layer,
        parser_ref=parser_ref,
        parser_type=parser_type,
        data_sources=sources,
        data_layer_fingerprint=fingerprint,
    )


def _in_profiles(plugin: object) -> bool:
    """Whether a plugin can run in a scheduling profile."""
    return isinstance(plugin, Filter | Scorer | Picker | DataProducer) or (
        saturation_filter.can_filter(plugin)
    )


def _is_handler(plugin: object) -> bool:
    return callable(getattr(plugin, "pick_profiles", None)) and callable(
        getattr(plugin, "process_results", None)
    )


def _kinds(plugin: object) -> str:
    kinds = [
        kind
        for kind, proto in (
            ("filter", Filter),
            ("scorer", Scorer),
            ("picker", Picker),
            ("data producer", DataProducer),
        )
        if isinstance(plugin, proto)
    ]
    return ", ".join(kinds) or "none of filter, scorer, picker, data producer"


class _Builder:
    def __init__(self, doc: document.Document, previous: PickerConfig | None) -> None:
        self.doc = doc
        self.previous = previous.plugins if previous is not None else {}
        self.instances: dict[str, object] = {}
        self.where: dict[str, str] = {}  # plugin name -> "plugins[2]" or "default plugin"
        self.specs: dict[str, document.PluginSpec] = {}

    # -- plugin instances ------------------------------------------------------------

    def _create(self, spec: document.PluginSpec) -> object:
        factory = registry.factory(spec.type)
        if factory is None:
            hint = parameters.did_you_mean(spec.type, registry.plugin_types())
            raise ConfigError(
                f"{spec.path}.type: unknown plugin type {spec.type!r}{hint}; "
                f"known types: {', '.join(registry.plugin_types())}"
            )
        try:
            plugin = factory(spec.name, spec.parameters)
        except parameters.ParameterError as exc:
            at = f"{spec.path}.parameters.{exc.key}" if exc.key else f"{spec.path}.parameters"
            raise ConfigError(f"{at} ({spec.type} {spec.name!r}): {exc.problem}") from None
        except ValueError as exc:
            raise ConfigError(f"{spec.path} ({spec.type} {spec.name!r}): {exc}") from None
        self.specs[spec.name] = spec
        old = self.previous.get(spec.name)
        if (
            old is not None
            # Data-layer plugins are kept as a whole pipeline (see build_data_layer).
            and not data_layer_section.is_source(plugin)
            and isinstance(old, StatefulPlugin)
            and getattr(old, "type_name", None) == spec.type
            and old.same_settings(plugin)
        ):
            plugin = old
        self.instances[spec.name] = plugin
        self.where[spec.name] = spec.path
        return plugin

    def _default(self, name: str, type_name: str) -> object:
        """The plugin called `name`: the declared one, else a new one with default settings."""
        plugin = self.instances.get(name)
        if plugin is None:
            return self._create(document.PluginSpec(name, type_name, None, f"default {name}"))
        if getattr(plugin, "type_name", None) != type_name:
            raise ConfigError(
                f"{self.where[name]}: the name {name!r} is needed for the default "
                f"{type_name}, but it is declared with type {getattr(plugin, 'type_name', '?')!r}"
            )
        return plugin

    def parser_type(self, ref: str) -> str:
        """The parser type the `parser:` section selects: a declared parser plugin's type,
        or a parser type named directly (so the default needs no declaration)."""
        plugin = self.instances.get(ref)
        if isinstance(plugin, registry.ParserDeclaration):
            return plugin.type_name
        if plugin is not None:
            raise ConfigError(
                f"parser.pluginRef: {ref!r} is a {getattr(plugin, 'type_name', '?')}, "
                "not a parser"
            )
        if ref in registry.parser_types():
            return ref
        declared = [
            n for n, p in self.instances.items() if isinstance(p, registry.ParserDeclaration)
        ]
        hint = parameters.did_you_mean(ref, [*declared, *registry.parser_types()])
        raise ConfigError(
            f"parser.pluginRef: no parser named {ref!r}{hint}; declare it under plugins or "
            f"name a parser type ({', '.join(registry.parser_types())})"
        )

    # -- assembly ------------------------------------------------------------------

    def build(self) -> framework.Scheduler:
        for spec in self.doc.plugins:
            self._create(spec)

        handlers = [name for name, p in self.instances.items() if _is_handler(p)]
        if len(handlers) > 1:
            raise ConfigError(
                f"more than one profile handler declared: {', '.join(handlers)}; keep one"
            )

        profile_specs = self.doc.profiles
        if profile_specs is None:
            profiles = [self._implicit_profile()]
        else:
            profiles = [self._profile(spec) for spec in profile_specs]

        if handlers:
            handler = self.instances[handlers[0]]
        elif len(profiles) == 1:
            handler = self._default(DEFAULT_HANDLER, DEFAULT_HANDLER)
        else:
            raise ConfigError(
                f"{len(profiles)} scheduling profiles need a profile handler; declare one "
                "under plugins"
            )
        check = getattr(handler, "check_profiles", None)
        if callable(check):
            name = getattr(handler, "name", "?")
            try:
                check([p.name for p in profiles])
            except parameters.ParameterError as exc:
                raise ConfigError(
                    f"{self.where[name]}.parameters.{exc.key}: {exc.problem}"
                ) from None
            except ValueError as exc:
                raise ConfigError(f"{self.where[name]}: {exc}") from None

        return framework.Scheduler(
            {p.name: p for p in profiles},
            cast(ProfileHandler, handler),  # checked structurally by _is_handler
        )

    # -- data layer ------------------------------------------------------------------

    def build_data_layer(
        self, previous: PickerConfig | None
    ) -> tuple[tuple[datalayer.DataSource, ...], str]:
        raw, key = self.doc.data_layer, self.doc.data_layer_key
        if raw is not None:
            wirings = data_layer_section.parse_section(raw, key)
        else:
            wirings = data_layer_section.DEFAULT_WIRING
        specs: dict[str, document.PluginSpec | None] = {
            name: self.specs.get(name) for name in self.instances
        }
        fingerprint = data_layer_section.fingerprint(wirings, specs)
        if previous is not None and previous.data_layer_fingerprint == fingerprint:
            # Same pipeline: keep the running instances (connections, extractor state).
            for source in previous.data_sources:
                self.instances[source.name] = source
                for extractor in source.extractors:
                    self.instances[extractor.name] = extractor
            return previous.data_sources, fingerprint
        built = data_layer_section.build(
            wirings, self.instances, self.where, self._default_data_layer_plugin
        )
        return built, fingerprint

    def _default_data_layer_plugin(self, name: str) -> object | None:
        if registry.factory(name) is None:
            return None
        plugin = self._default(name, name)
        is_data = data_layer_section.is_source(plugin) or data_layer_section.is_extractor(plugin)
        if not is_data:
            del self.instances[name]  # a scheduling type named here is a mistake; report it
            return None
        return plugin

    def check_consumed_metrics(
        self, scheduler: framework.Scheduler, sources: Sequence[datalayer.DataSource]
    ) -> None:
        scorers = [w.scorer for p in scheduler.profiles.values() for w in p.scorers]
        data_layer_section.check_consumers(scorers, sources, self.where, self.doc.data_layer_key)

    def _implicit_profile(self) -> framework.SchedulingProfile:
        declared = [
            document.PluginRef(spec.name, None, spec.path)
            for spec in self.doc.plugins
            if _in_profiles(self.instances[spec.name])
        ]
        if any(
            isinstance(self.instances[ref.plugin], Filter | Scorer | Picker)
            or saturation_filter.can_filter(self.instances[ref.plugin])
            for ref in declared
        ):
            return self._profile(document.ProfileSpec(DEFAULT_PROFILE, tuple(declared), "plugins"))
        for name, _ in DEFAULT_SCORERS:
            self._default(name, name)
        refs = [document.PluginRef(name, weight, "default") for name, weight in DEFAULT_SCORERS]
        refs.extend(
            document.PluginRef(ref.plugin, None, ref.path)
            for ref in declared  # declared producers still run
        )
        return self._profile(document.ProfileSpec(DEFAULT_PROFILE, tuple(refs), "default"))

    def _profile(self, spec: document.ProfileSpec) -> framework.SchedulingProfile:
        filters: list[Filter] = []
        scorers: list[framework.WeightedScorer] = []
        producers: list[DataProducer] = []
        picker: Picker | None = None
        picker_ref = ""
        for ref in spec.refs:
            plugin = self.instances.get(ref.plugin)
            if plugin is None:
                hint = parameters.did_you_mean(ref.plugin, self.instances)
                raise ConfigError(
                    f"{ref.path}.pluginRef: no plugin named {ref.plugin!r} is declared under "
                    f"plugins{hint}"
                )
            if _is_handler(plugin):
                raise ConfigError(
                    f"{ref.path}: {ref.plugin!r} is a profile handler; handlers choose "
                    "profiles and are not part of one"
                )
            used = False
            if isinstance(plugin, Scorer):
                weight = 1.0 if ref.weight is None else ref.weight
                scorers.append(framework.WeightedScorer(plugin, weight))
                used = True
                self._wire_producer(plugin, ref, producers)
            elif ref.weight is not None:
                raise ConfigError(
                    f"{ref.path}.weight: {ref.plugin!r} is not a scorer ({_kinds(plugin)}); "
                    "only scorers take a weight"
                )
            if isinstance(plugin, Picker):
                if picker is not None:
                    raise ConfigError(
                        f"{ref.path}: profile {spec.name!r} already has picker "
                        f"{picker_ref!r}; a profile has one picker"
                    )
                picker, picker_ref, used = plugin, ref.plugin, True
            if isinstance(plugin, Filter):
                filters.append(plugin)
                used = True
            elif saturation_filter.can_filter(plugin):
                filters.append(saturation_filter.SaturationFilter(plugin))  # type: ignore[arg-type]
                used = True
            if isinstance(plugin, DataProducer):
                if plugin not in producers:
                    producers.append(plugin)
                used = True
            if not used:
                raise ConfigError(
                    f"{ref.path}: {ref.plugin!r} (type "
                    f"{getattr(plugin, 'type_name', '?')}) cannot run in a scheduling profile; "
                    "it is not a filter, scorer, picker or data producer"
                )
        if picker is None:
            default_picker = self._default(DEFAULT_PICKER, DEFAULT_PICKER)
            assert isinstance(default_picker, Picker)
            picker = default_picker
        return framework.SchedulingProfile(
            spec.name, picker=picker, filters=filters, scorers=scorers, producers=producers
        )

    def _wire_producer(
        self, scorer: object, ref: document.PluginRef, producers: list[DataProducer]
    ) -> None:
        """Put the producer a scorer reads into the profile, creating the default one."""
        needed = getattr(scorer, "required_producer", None)
        if not isinstance(needed, str):
            return
        producer = self.instances.get(needed)
        if producer is None:
            if needed != DEFAULT_PREFIX_PRODUCER:
                hint = parameters.did_you_mean(needed, self.instances)
                raise ConfigError(
                    f"{self.where.get(ref.plugin, ref.path)}: {ref.plugin!r} reads data from "
                    f"producer {needed!r}, which is not declared under plugins{hint}"
                )
            producer = self._default(needed, DEFAULT_PREFIX_PRODUCER)
        if not isinstance(producer, DataProducer):
            raise ConfigError(
                f"{self.where.get(ref.plugin, ref.path)}: {ref.plugin!r} reads data from "
                f"{needed!r}, which is not a data producer ({_kinds(producer)})"
            )
        if producer not in producers:
            producers.append(producer)
