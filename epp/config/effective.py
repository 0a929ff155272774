"""The effective config: what the picker runs with, written as an `EndpointPickerConfig`.

A short config runs with more than it says: the loader adds a picker to every profile, a
profile handler, the default profile when none is declared, the producer a scorer reads,
the data layer, the in-flight tracker. `sluice picker --validate-config` prints the
result with every part the file did not declare marked `# added by default`, so the
count of plugins it reports can be checked against the file. The text is valid YAML and
loads back into the same plugins and profiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import yaml

from epp.config import document, loader
from epp.scheduling import framework

ADDED = "  # added by default"


@dataclass(frozen=True, slots=True)
class EffectiveConfig:
    text: str  # YAML, with `# added by default` comments
    declared: tuple[str, ...]  # plugin names the file declares, in its order
    added: tuple[str, ...]  # plugin names the loader added
    profiles: tuple[str, ...]

    def summary(self) -> str:
        added = f" ({', '.join(self.added)})" if self.added else ""
        return (
            f"valid: {_count(len(self.declared), 'plugin')} declared, "
            f"{len(self.added)} added by default{added}; profiles: {', '.join(self.profiles)}"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _flow(value: object) -> str:
    """One-line YAML for a value written in the config (parameters, a section)."""
    dumped: str = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return dumped.strip().removesuffix("...").strip()


def describe(text: str | None) -> EffectiveConfig:
    """Load `text` as the picker would and describe the result; raises ConfigError."""
    config = loader.load_config(text)
    doc = document.parse(text)
    declared = tuple(spec.name for spec in doc.plugins)
    added = tuple(name for name in config.plugins if name not in declared)
    raw = yaml.safe_load(text) if text and text.strip() else None
    api_version = raw.get("apiVersion") if isinstance(raw, Mapping) else None
    lines = [
        f"apiVersion: {api_version or document.API_VERSIONS[0]}",
        f"kind: {document.KIND}",
    ]
    if doc.feature_gates:
        lines.append(f"featureGates: {_flow(sorted(doc.feature_gates))}")
    lines += _plugins(config, doc)
    lines += _profiles(config, doc)
    parser = _flow({"pluginRef": config.parser_ref})
    lines.append(f"parser: {parser}" + ("" if doc.parser_ref else ADDED))
    if doc.saturation_detector is not None:
        lines.append(f"saturationDetector: {_flow(dict(doc.saturation_detector))}")
    else:
        lines.append(f"saturationDetector: {{}}{ADDED} (a utilization-detector, its defaults)")
    lines += _data_layer(config, doc)
    if doc.flow_control is not None:
        lines.append(f"flowControl: {_flow(dict(doc.flow_control))}")
    return EffectiveConfig(
        text="\n".join(lines),
        declared=declared,
        added=added,
        profiles=tuple(config.scheduler.profiles),
    )


def _plugins(config: loader.PickerConfig, doc: document.Document) -> list[str]:
    declared = {spec.name: spec for spec in doc.plugins}
    ordered = [*declared, *(name for name in config.plugins if name not in declared)]
    lines = ["plugins:"]
    for name in ordered:
        spec = declared.get(name) or config.plugin_specs.get(name)
        type_name = spec.type if spec else str(getattr(config.plugins[name], "type_name", "?"))
        entry = [f"- type: {type_name}"]
        if name != type_name:
            entry.append(f"  name: {name}")
        if spec is not None and spec.parameters:
            entry.append(f"  parameters: {_flow(dict(spec.parameters))}")
        if name not in declared:
            entry[0] += ADDED
        lines += entry
    return lines


def _profiles(config: loader.PickerConfig, doc: document.Document) -> list[str]:
    config_plugins = config.plugins
    specs = {spec.name: spec for spec in doc.profiles or ()}
    lines = ["schedulingProfiles:"]
    for profile in config.scheduler.profiles.values():
        spec = specs.get(profile.name)
        if spec is None:
            why = "every declared filter, scorer and picker" if doc.plugins else "built in"
            lines.append(f"- name: {profile.name}{ADDED} ({why})")
        else:
            lines.append(f"- name: {profile.name}")
        lines.append("  plugins:")
        written = [ref.plugin for ref in spec.refs] if spec else []
        refs = _refs(profile, config_plugins)
        for name in [*(n for n in written if n in refs), *(n for n in refs if n not in written)]:
            weight = refs[name]
            line = f"  - pluginRef: {name}"
            if weight is not None:
                line = f"  - {{pluginRef: {name}, weight: {weight:g}}}"
            if spec is not None and name not in written:
                line += ADDED
            lines.append(line)
        for name in _names(profile.filters):
            if name not in config_plugins:
                # The flowControl gate runs the saturation detector first as a filter; the
                # detector is no plugin, so it is a comment (the text stays loadable).
                lines.append(f"  # - pluginRef: {name}  (filter added by the flowControl gate)")
    return lines


def _names(plugins: Iterable[object]) -> list[str]:
    return [str(getattr(plugin, "name", "?")) for plugin in plugins]


def _refs(
    profile: framework.SchedulingProfile, plugins: Mapping[str, object]
) -> dict[str, float | None]:
    """Plugin name -> weight (None: not a scorer) of the plugins the profile runs."""
    refs: dict[str, float | None] = {}
    for name in _names((*profile.producers, *profile.filters)):
        if name in plugins:
            refs.setdefault(name, None)
    for weighted in profile.scorers:
        refs[weighted.scorer.name] = weighted.weight
    refs.setdefault(str(getattr(profile.picker, "name", "?")), None)
    return refs


def _data_layer(config: loader.PickerConfig, doc: document.Document) -> list[str]:
    header = f"{doc.data_layer_key}:" + ("" if doc.data_layer is not None else ADDED)
    lines = [header, "  sources:"]
    for source in config.data_sources:
        lines.append(f"  - pluginRef: {source.name}")
        lines.append("    extractors:")
        lines += [f"    - pluginRef: {extractor.name}" for extractor in source.extractors]
    return lines
