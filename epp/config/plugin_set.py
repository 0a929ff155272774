"""The plugin instances of one config, by name: declared ones and defaults.

`create` builds a declared plugin through the registry, reporting bad types and
parameters with the plugin's path in the document. On reload, a plugin whose instance
carries learned state (`StatefulPlugin`: the prefix index, the in-flight counts) is kept
from the previous config when its name, type and settings are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from epp import parameters
from epp.config import data_layer as data_layer_section
from epp.config import document, registry
from epp.config.document import ConfigError


@runtime_checkable
class StatefulPlugin(Protocol):
    """A plugin whose instance carries learned state worth keeping across reloads."""

    def same_settings(self, other: object) -> bool: ...


class PluginSet:
    def __init__(self, previous: Mapping[str, object]) -> None:
        self.previous = previous
        self.instances: dict[str, object] = {}
        self.where: dict[str, str] = {}  # plugin name -> "plugins[2]" or "default plugin"
        self.specs: dict[str, document.PluginSpec] = {}

    def create(self, spec: document.PluginSpec) -> object:
        """Build a declared plugin; keep the previous config's instance of the same name,
        type and settings when it has state."""
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

    def default(self, name: str, type_name: str) -> object:
        """The plugin called `name`: the declared one, else a new one with default settings."""
        plugin = self.instances.get(name)
        if plugin is None:
            return self.create(document.PluginSpec(name, type_name, None, f"default {name}"))
        if getattr(plugin, "type_name", None) != type_name:
            raise ConfigError(
                f"{self.where[name]}: the name {name!r} is needed for the default "
                f"{type_name}, but it is declared with type {getattr(plugin, 'type_name', '?')!r}"
            )
        return plugin
