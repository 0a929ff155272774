"""The `dataLayer:` (or `data:`) section: which data sources run and which extractors each
feeds.

    dataLayer:
      sources:
      - pluginRef: metrics-data-source
        extractors:
        - pluginRef: core-metrics-extractor
        - pluginRef: queue-depth          # a prometheus-metric extractor

Sources and extractors are declared under `plugins` like every other plugin; this section
only wires them. As with the default picker, a reference to an undeclared plugin whose name
is a data-layer type (`metrics-data-source`, `core-metrics-extractor`, ...) gets that
type with default parameters, so the short form (a name only) works without declarations.

Checked here: every reference resolves to a plugin of the right kind, a
source is listed once and has at least one extractor, an extractor's input type matches
its source's output type, and every declared source or extractor is wired somewhere (a
declared but unwired extractor is almost always a forgotten line). Without the section
the pipeline is `metrics-data-source` -> `core-metrics-extractor`, using declared plugins
of those names when there are any (so declaring `core-metrics-extractor` with an `engines`
parameter tunes the default pipeline).

`fingerprint` describes a pipeline by names, types and parameters. When a reloaded config
has the same fingerprint as the running one, the loader keeps the running source
instances, so their kept-alive connections and the extractors' state carry over.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from epp import parameters
from epp.config import document
from epp.config.document import ConfigError, PluginSpec
from epp.datalayer import interfaces

DEFAULT_SOURCE = "metrics-data-source"
DEFAULT_EXTRACTOR = "core-metrics-extractor"


@dataclass(frozen=True, slots=True)
class SourceWiring:
    source: str
    extractors: tuple[tuple[str, str], ...]  # (plugin name, path for messages)
    path: str


# No section: scrape `/metrics` into the core fields (plugins created by `build` when not
# declared under these names).
_DEFAULT = "default data layer"
DEFAULT_WIRING = (SourceWiring(DEFAULT_SOURCE, ((DEFAULT_EXTRACTOR, _DEFAULT),), _DEFAULT),)


def is_source(plugin: object) -> bool:
    return isinstance(plugin, interfaces.DataSource)


def is_extractor(plugin: object) -> bool:
    return isinstance(plugin, interfaces.Extractor) and not is_source(plugin)


def _ref(item: object, path: str) -> str:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{path}: must be a mapping with 'pluginRef', got {item!r}")
    return str(item["pluginRef"]) if "pluginRef" in item else ""


def parse_section(raw: Mapping[str, object], key: str) -> tuple[SourceWiring, ...]:
    """The section's wiring, shape-checked (references are resolved by `build`)."""
    document.check_keys(raw, ("sources",), key)
    items = raw.get("sources")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise ConfigError(f"{key}.sources: must be a list, got {type(items).__name__}")
    wirings: list[SourceWiring] = []
    for i, item in enumerate(items):
        path = f"{key}.sources[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {item!r}")
        document.check_keys(item, ("pluginRef", "extractors"), path)
        source = _ref(item, path)
        if not source or not isinstance(item.get("pluginRef"), str):
            raise ConfigError(f"{path}.pluginRef: required, the name of a declared data source")
        extractors = item.get("extractors")
        if not isinstance(extractors, list) or not extractors:
            raise ConfigError(
                f"{path}.extractors: data source {source!r} needs a non-empty list of "
                "extractors (a source whose payload nobody reads only costs scrapes)"
            )
        refs: list[tuple[str, str]] = []
        for j, extractor in enumerate(extractors):
            ref_path = f"{path}.extractors[{j}]"
            if isinstance(extractor, Mapping):
                document.check_keys(extractor, ("pluginRef",), ref_path)
            name = _ref(extractor, ref_path)
            if not name:
                raise ConfigError(f"{ref_path}.pluginRef: required, the name of an extractor")
            if name in (r[0] for r in refs):
                raise ConfigError(f"{ref_path}: extractor {name!r} is listed twice for {source!r}")
            refs.append((name, ref_path))
        wirings.append(SourceWiring(source, tuple(refs), path))
    return tuple(wirings)


def build(
    wirings: Sequence[SourceWiring],
    instances: Mapping[str, object],
    where: Mapping[str, str],
    create_default: Callable[[str], object | None],
) -> tuple[interfaces.DataSource, ...]:
    """Wire declared extractors into declared sources; ConfigError for any mismatch.
    `create_default(name)` builds an undeclared plugin named after its type, or None."""
    sources: list[interfaces.DataSource] = []
    wired: set[str] = set()
    for wiring in wirings:
        source = instances.get(wiring.source) or create_default(wiring.source)
        if source is None:
            hint = parameters.did_you_mean(wiring.source, instances)
            raise ConfigError(
                f"{wiring.path}.pluginRef: no plugin named {wiring.source!r} is declared "
                f"under plugins{hint}"
            )
        if not is_source(source):
            raise ConfigError(
                f"{wiring.path}.pluginRef: {wiring.source!r} (type "
                f"{getattr(source, 'type_name', '?')}) is not a data source"
            )
        assert isinstance(source, interfaces.DataSource)
        if wiring.source in wired:
            raise ConfigError(f"{wiring.path}: data source {wiring.source!r} is listed twice")
        wired.add(wiring.source)
        for name, path in wiring.extractors:
            extractor = instances.get(name) or create_default(name)
            if extractor is None:
                hint = parameters.did_you_mean(name, instances)
                raise ConfigError(
                    f"{path}.pluginRef: no plugin named {name!r} is declared under plugins{hint}"
                )
            if not is_extractor(extractor):
                raise ConfigError(
                    f"{path}.pluginRef: {name!r} (type {getattr(extractor, 'type_name', '?')}) "
                    "is not an extractor"
                )
            assert isinstance(extractor, interfaces.Extractor)
            try:
                source.add_extractor(extractor)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            wired.add(name)
        sources.append(source)
    for name, plugin in instances.items():
        if (is_source(plugin) or is_extractor(plugin)) and name not in wired:
            kind = "data source" if is_source(plugin) else "extractor"
            raise ConfigError(
                f"{where.get(name, name)}: {kind} {name!r} is declared but not wired; list "
                "it under dataLayer.sources (or remove it)"
            )
    return tuple(sources)


def produced_metrics(sources: Sequence[interfaces.DataSource]) -> frozenset[str]:
    names: set[str] = set()
    for source in sources:
        for extractor in source.extractors:
            names |= interfaces.produced_metrics(extractor)
    return frozenset(names)


def check_consumers(
    consumers: Sequence[object],
    sources: Sequence[interfaces.DataSource],
    where: Mapping[str, str],
    section_key: str,
) -> None:
    """Every custom metric a plugin `consumes` must be `produces`d by a wired extractor."""
    produced = produced_metrics(sources)
    for plugin in consumers:
        consumes: frozenset[str] = getattr(plugin, "consumes", frozenset())
        for metric in sorted(consumes - produced):
            name = str(getattr(plugin, "name", "?"))
            offered = ", ".join(sorted(produced)) or "none"
            raise ConfigError(
                f"{where.get(name, name)} ({getattr(plugin, 'type_name', '?')} {name!r}): "
                f"reads custom metric {metric!r}, but no extractor in {section_key} "
                f"produces it (produced: {offered}); wire a prometheus-metric extractor "
                f"with metricName: {metric}"
            )


def fingerprint(wirings: Sequence[SourceWiring], specs: Mapping[str, PluginSpec | None]) -> str:
    """A stable text for "the same pipeline": names, types and parameters, in order."""

    def describe(name: str) -> object:
        spec = specs.get(name)
        return [name, spec.type if spec else None, spec.parameters if spec else None]

    shape = [[describe(w.source), [describe(name) for name, _ in w.extractors]] for w in wirings]
    return json.dumps(shape, sort_keys=True, default=repr)
