"""Strict decoding of an `EndpointPickerConfig` YAML document into plain specs.

This module only checks shape: keys, types, required fields, references between names
that the document alone can settle. It knows nothing of plugin behaviour; `loader` turns
the specs into plugin instances and a scheduler. Every error names the path of the
offending value (`schedulingProfiles[0].plugins[1].weight`) and, for a mistyped key, the
key it probably meant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from epp import parameters

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
KIND = "EndpointPickerConfig"
# Upstream's gate names; a misspelt gate silently disabling a feature is worse than an error.
FEATURE_GATES = ("dataLayer", "flowControl", "prepareDataPlugins")

_TOP_LEVEL_KEYS = (
    "apiVersion",
    "kind",
    "featureGates",
    "plugins",
    "schedulingProfiles",
    "saturationDetector",
    "dataLayer",
    "data",
    "flowControl",
    "parser",
)


class ConfigError(ValueError):
    """The config is invalid; the message says where and what to change."""


@dataclass(frozen=True, slots=True)
class PluginSpec:
    name: str
    type: str
    parameters: Mapping[str, object] | None
    path: str  # where it was declared, for messages: "plugins[2]"


@dataclass(frozen=True, slots=True)
class PluginRef:
    plugin: str
    weight: float | None
    path: str


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    name: str
    refs: tuple[PluginRef, ...]
    path: str


@dataclass(frozen=True, slots=True)
class Document:
    feature_gates: frozenset[str] = frozenset()
    plugins: tuple[PluginSpec, ...] = ()
    profiles: tuple[ProfileSpec, ...] | None = None  # None: the section is absent
    saturation_detector: Mapping[str, object] | None = None
    data_layer: Mapping[str, object] | None = None
    data_layer_key: str = "dataLayer"  # how the document spelt the section, for messages
    flow_control: Mapping[str, object] | None = None
    parser_ref: str | None = None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key; construct_mapping reports it
            continue
        if duplicate:
            raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _mapping(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: must be a mapping, got {_kind_of(value)}")
    return value


def _list(value: object, path: str) -> Sequence[object]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list, got {_kind_of(value)}")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else _kind_of(value)
        raise ConfigError(f"{path}: must be a non-empty string, got {got}")
    return value


def check_keys(mapping: Mapping[str, object], allowed: Sequence[str], where: str) -> None:
    """Every key of a section is a string it allows (`parameters.unknown_key` words the
    hint the same way for every strict reader)."""
    for key in mapping:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
    unknown = parameters.unknown_key(mapping, allowed)
    if unknown is not None:
        key, hint = unknown
        raise ConfigError(f"unknown key {key!r} in {where}{hint}")


def parse(text: str | None) -> Document:
    """Decode the YAML text; None, empty or a document of only comments is the default."""
    if text is None or not text.strip():
        return Document()
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from None
    if raw is None:
        return Document()
    return _document(_mapping(raw, KIND))


def _document(raw: Mapping[str, object]) -> Document:
    check_keys(raw, _TOP_LEVEL_KEYS, KIND)

    api_version = raw.get("apiVersion")
    if api_version not in API_VERSIONS:
        problem = "missing" if api_version is None else f"is {api_version!r}"
        raise ConfigError(f"apiVersion {problem}; expected one of {', '.join(API_VERSIONS)}")
    kind = raw.get("kind")
    if kind != KIND:
        problem = "missing" if kind is None else f"is {kind!r}"
        raise ConfigError(f"kind {problem}; expected {KIND}")

    gates: set[str] = set()
    for i, gate in enumerate(_list(raw.get("featureGates"), "featureGates")):
        path = f"featureGates[{i}]"
        name = _string(gate, path)
        if name not in FEATURE_GATES:
            hint = parameters.did_you_mean(name, FEATURE_GATES)
            raise ConfigError(
                f"{path}: unknown feature gate {name!r}{hint or ''}; "
                f"known gates: {', '.join(FEATURE_GATES)}"
            )
        gates.add(name)

    if "dataLayer" in raw and "data" in raw:
        raise ConfigError(
            "both 'dataLayer' and 'data' are set; they are two names for the same section, keep one"
        )
    data_key = "data" if "data" in raw else "dataLayer"

    return Document(
        feature_gates=frozenset(gates),
        plugins=_plugins(raw.get("plugins")),
        profiles=_profiles(raw["schedulingProfiles"]) if "schedulingProfiles" in raw else None,
        saturation_detector=_optional_mapping(raw.get("saturationDetector"), "saturationDetector"),
        data_layer=_optional_mapping(raw.get(data_key), data_key),
        data_layer_key=data_key,
        flow_control=_optional_mapping(raw.get("flowControl"), "flowControl"),
        parser_ref=_parser_ref(raw.get("parser")),
    )


def _optional_mapping(value: object, path: str) -> Mapping[str, object] | None:
    return None if value is None else _mapping(value, path)


def _parser_ref(value: object) -> str | None:
    if value is None:
        return None
    section = _mapping(value, "parser")
    check_keys(section, ("pluginRef",), "parser")
    return _string(section.get("pluginRef"), "parser.pluginRef")


def _plugins(value: object) -> tuple[PluginSpec, ...]:
    specs: list[PluginSpec] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(_list(value, "plugins")):
        path = f"plugins[{i}]"
        entry = _mapping(item, path)
        check_keys(entry, ("name", "type", "parameters"), path)
        if "type" not in entry:
            raise ConfigError(f"{path}: missing required key 'type'")
        type_name = _string(entry["type"], f"{path}.type")
        name = _string(entry.get("name", type_name), f"{path}.name")
        if name in seen:
            raise ConfigError(
                f"{path}: plugin name {name!r} is already used by {seen[name]}; "
                "names must be unique (give one of them a 'name:')"
            )
        seen[name] = path
        params = entry.get("parameters")
        if params is not None:
            params = _mapping(params, f"{path}.parameters")
        specs.append(PluginSpec(name, type_name, params, path))
    return tuple(specs)


def _profiles(value: object) -> tuple[ProfileSpec, ...]:
    profiles: list[ProfileSpec] = []
    seen: set[str] = set()
    items = _list(value, "schedulingProfiles")
    if not items:
        raise ConfigError("schedulingProfiles: must list at least one profile when present")
    for i, item in enumerate(items):
        path = f"schedulingProfiles[{i}]"
        entry = _mapping(item, path)
        check_keys(entry, ("name", "plugins"), path)
        if "name" not in entry:
            raise ConfigError(f"{path}: missing required key 'name'")
        name = _string(entry["name"], f"{path}.name")
        if name in seen:
            raise ConfigError(f"{path}: profile name {name!r} is used twice")
        seen.add(name)
        refs: list[PluginRef] = []
        referenced: set[str] = set()
        for j, ref_item in enumerate(_list(entry.get("plugins"), f"{path}.plugins")):
            ref_path = f"{path}.plugins[{j}]"
            ref = _mapping(ref_item, ref_path)
            check_keys(ref, ("pluginRef", "weight"), ref_path)
            if "pluginRef" not in ref:
                raise ConfigError(f"{ref_path}: missing required key 'pluginRef'")
            plugin = _string(ref["pluginRef"], f"{ref_path}.pluginRef")
            if plugin in referenced:
                raise ConfigError(f"{ref_path}: plugin {plugin!r} is referenced twice in {name!r}")
            referenced.add(plugin)
            refs.append(PluginRef(plugin, _weight(ref.get("weight"), ref_path), ref_path))
        profiles.append(ProfileSpec(name, tuple(refs), path))
    return tuple(profiles)


def _weight(value: object, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}.weight: must be a number >= 0, got {_kind_of(value)} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{path}.weight: must be a finite number >= 0, got {value}")
    return float(value)
