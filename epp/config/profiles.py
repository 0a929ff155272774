"""Scheduling profiles and the profile handler, assembled from the document.

A profile holds filters, scorers, data producers and at most one picker (none given:
`max-score-picker`); `weight` only on scorers (default 1). A scorer that reads a data
producer (`prefix-cache-scorer`) gets that producer in its profile; the default
`approx-prefix-cache-producer` is created when not declared. A saturation detector named
in a profile runs there as a filter. One profile and no handler: `single-profile-handler`;
several profiles need a handler.

No `schedulingProfiles`: if filters, scorers or pickers are declared, one profile named
`default` uses them all (weight 1) in declaration order; otherwise the built-in default
profile runs — `queue-scorer` x2, `kv-cache-utilization-scorer` x2, `prefix-cache-scorer`
x3 (with `approx-prefix-cache-producer`), `max-score-picker`, `single-profile-handler` —
using any declared plugin whose name matches one of those (so declaring
`approx-prefix-cache-producer` with parameters tunes the default).
"""

from __future__ import annotations

from typing import cast

from epp import parameters
from epp.config import document, registry
from epp.config.document import ConfigError
from epp.config.plugin_set import PluginSet
from epp.scheduling import framework
from epp.scheduling.interfaces import DataProducer, Filter, Picker, ProfileHandler, Scorer
from epp.scheduling.plugins import saturation_filter

DEFAULT_PROFILE = "default"
DEFAULT_PICKER = "max-score-picker"
DEFAULT_HANDLER = "single-profile-handler"
# (plugin name = type, weight) of the built-in default profile's scorers.
DEFAULT_SCORERS = (
    ("queue-scorer", 2.0),
    ("kv-cache-utilization-scorer", 2.0),
    ("prefix-cache-scorer", 3.0),
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


def build_scheduler(plugins: PluginSet, doc: document.Document) -> framework.Scheduler:
    """The profiles and the handler; every declared plugin is created first."""
    for spec in doc.plugins:
        plugins.create(spec)

    handlers = [name for name, p in plugins.instances.items() if _is_handler(p)]
    if len(handlers) > 1:
        raise ConfigError(
            f"more than one profile handler declared: {', '.join(handlers)}; keep one"
        )

    profile_specs = doc.profiles
    if profile_specs is None:
        profiles = [_implicit_profile(plugins, doc)]
    else:
        profiles = [_profile(plugins, spec) for spec in profile_specs]

    if handlers:
        handler = plugins.instances[handlers[0]]
    elif len(profiles) == 1:
        handler = plugins.default(DEFAULT_HANDLER, DEFAULT_HANDLER)
    else:
        raise ConfigError(
            f"{len(profiles)} scheduling profiles need a profile handler; declare one under plugins"
        )
    check = getattr(handler, "check_profiles", None)
    if callable(check):
        name = getattr(handler, "name", "?")
        try:
            check([p.name for p in profiles])
        except parameters.ParameterError as exc:
            raise ConfigError(
                f"{plugins.where[name]}.parameters.{exc.key}: {exc.problem}"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"{plugins.where[name]}: {exc}") from None

    return framework.Scheduler(
        {p.name: p for p in profiles},
        cast(ProfileHandler, handler),  # checked structurally by _is_handler
    )


def _implicit_profile(plugins: PluginSet, doc: document.Document) -> framework.SchedulingProfile:
    declared = [
        document.PluginRef(spec.name, None, spec.path)
        for spec in doc.plugins
        if _in_profiles(plugins.instances[spec.name])
    ]
    if any(
        isinstance(plugins.instances[ref.plugin], Filter | Scorer | Picker)
        or saturation_filter.can_filter(plugins.instances[ref.plugin])
        for ref in declared
    ):
        return _profile(plugins, document.ProfileSpec(DEFAULT_PROFILE, tuple(declared), "plugins"))
    for name, _ in DEFAULT_SCORERS:
        plugins.default(name, name)
    refs = [document.PluginRef(name, weight, "default") for name, weight in DEFAULT_SCORERS]
    refs.extend(
        document.PluginRef(ref.plugin, None, ref.path)
        for ref in declared  # declared producers still run
    )
    return _profile(plugins, document.ProfileSpec(DEFAULT_PROFILE, tuple(refs), "default"))


def _profile(plugins: PluginSet, spec: document.ProfileSpec) -> framework.SchedulingProfile:
    filters: list[Filter] = []
    scorers: list[framework.WeightedScorer] = []
    producers: list[DataProducer] = []
    picker: Picker | None = None
    picker_ref = ""
    for ref in spec.refs:
        plugin = plugins.instances.get(ref.plugin)
        if plugin is None:
            hint = parameters.did_you_mean(ref.plugin, plugins.instances)
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
            _wire_producer(plugins, plugin, ref, producers)
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
        default_picker = plugins.default(DEFAULT_PICKER, DEFAULT_PICKER)
        assert isinstance(default_picker, Picker)
        picker = default_picker
    return framework.SchedulingProfile(
        spec.name, picker=picker, filters=filters, scorers=scorers, producers=producers
    )


def _wire_producer(
    plugins: PluginSet,
    scorer: object,
    ref: document.PluginRef,
    producers: list[DataProducer],
    depth: int = 0,
) -> None:
    """Put the producer a plugin reads into the profile, after the producers it reads in
    turn (the latency predictor reads the prefix producer); an undeclared producer named
    by its type is created with default parameters."""
    needed = getattr(scorer, "required_producer", None)
    if not isinstance(needed, str):
        return
    if depth > 8:
        raise ConfigError(f"{ref.path}: producers read each other in a cycle through {needed!r}")
    producer = plugins.instances.get(needed)
    if producer is None:
        if registry.factory(needed) is None:
            hint = parameters.did_you_mean(needed, plugins.instances)
            raise ConfigError(
                f"{plugins.where.get(ref.plugin, ref.path)}: {ref.plugin!r} reads data from "
                f"producer {needed!r}, which is not declared under plugins{hint}"
            )
        producer = plugins.default(needed, needed)
    if not isinstance(producer, DataProducer):
        raise ConfigError(
            f"{plugins.where.get(ref.plugin, ref.path)}: {ref.plugin!r} reads data from "
            f"{needed!r}, which is not a data producer ({_kinds(producer)})"
        )
    if producer is not scorer:
        _wire_producer(plugins, producer, ref, producers, depth + 1)
    if producer not in producers:
        producers.append(producer)


def with_saturation_filter(scheduler: framework.Scheduler, detector: object) -> framework.Scheduler:
    """With flow control on, every profile first keeps the endpoints with room (the
    detector's filter face), so a request the gate let go because some endpoint had room
    goes to one that has it. Profiles that already name the detector keep their order."""
    profiles = {}
    for name, profile in scheduler.profiles.items():
        named = any(
            isinstance(f, saturation_filter.SaturationFilter) and f.detector is detector
            for f in profile.filters
        )
        filters = (
            profile.filters
            if named
            else (
                saturation_filter.SaturationFilter(detector),  # type: ignore[arg-type]
                *profile.filters,
            )
        )
        profiles[name] = framework.SchedulingProfile(
            name,
            picker=profile.picker,
            filters=filters,
            scorers=profile.scorers,
            producers=profile.producers,
        )
    return framework.Scheduler(profiles, scheduler.handler)
