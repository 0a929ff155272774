"""The `saturationDetector` and `flowControl` sections of an `EndpointPickerConfig`.

    featureGates: [flowControl]
    saturationDetector:            # utilization-detector parameters, or {pluginRef: name}
      queueDepthThreshold: 5
      kvCacheUtilThreshold: 0.8
      metricsStalenessThreshold: 200ms
    flowControl:
      maxRequests: 1k              # queued requests, all bands (0 or absent: no limit)
      maxBytes: 1Gi                # queued body bytes, all bands
      defaultRequestTTL: 30s       # longest wait in the queue (absent: no limit) -> 503
      retryAfter: 1s               # retry-after sent with a 429
      dispatchPollInterval: 10ms   # how often a saturated pool is looked at again
      defaultPriorityBand:         # for priorities without a band of their own
        orderingPolicyRef: fcfs-ordering-policy
        fairnessPolicyRef: global-strict-fairness-policy
      priorityBands:
      - priority: 10
        maxRequests: 100
        maxBytes: 100Mi
        saturationCeiling: 1.0     # dispatch stops while saturation >= this
        orderingPolicyRef: workload-aware-ordering-policy
        fairnessPolicyRef: round-robin-fairness-policy

`saturationDetector: {pluginRef: utilization-detector}` without a declaration gets one with
default parameters. The saturation detector is built whether or not the gate is on:
without flow control it still decides when sheddable requests (priority < 0) are dropped.

A policy ref names a plugin declared under `plugins:` (so it can carry parameters) or a
policy type (created with default parameters through the one plugin registry). When
exactly one ordering (or fairness) policy is declared under `plugins:`, bands that name
none use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from epp import parameters
from epp.config import registry
from epp.config.document import ConfigError
from epp.flowcontrol import plan, saturation, workload_aware
from epp.flowcontrol.interfaces import FairnessPolicy, OrderingPolicy, SaturationDetector
from epp.flowcontrol.settings import BandSettings, FlowControlSettings

DEFAULT_ORDERING = "fcfs-ordering-policy"
DEFAULT_FAIRNESS = "global-strict-fairness-policy"
DEFAULT_DETECTOR_NAME = "saturation-detector"
DETECTOR_TYPE = saturation.UtilizationDetector.type_name


class _Section:
    """A strict mapping reader whose errors carry the section's path."""

    def __init__(self, raw: object, path: str) -> None:
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {raw!r}")
        self.path = path
        self.reader = parameters.ParameterReader(raw)

    def __enter__(self) -> parameters.ParameterReader:
        return self.reader

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, parameters.ParameterError):
            raise ConfigError(f"{self.path}.{error.key}: {error.problem}") from None
        if error is None:
            leftover = self.reader.leftover()
            if leftover is not None:
                key, hint = leftover
                raise ConfigError(f"unknown key {key!r} in {self.path}{hint}")


def detector(raw: Mapping[str, object] | None, plugins: Mapping[str, object]) -> SaturationDetector:
    """The `saturationDetector` section: a reference to a declared detector, or parameters
    of a `utilization-detector` (absent: its defaults)."""
    if raw is not None and "pluginRef" in raw:
        extra = sorted(set(raw) - {"pluginRef"})
        if extra:
            raise ConfigError(
                f"saturationDetector: give either pluginRef or parameters, not both ({extra[0]!r})"
            )
        ref = raw["pluginRef"]
        plugin = plugins.get(ref) if isinstance(ref, str) else None
        if not isinstance(plugin, SaturationDetector):
            raise ConfigError(
                f"saturationDetector.pluginRef: {ref!r} is not a declared utilization-detector"
            )
        return plugin
    try:
        return saturation.UtilizationDetector.from_parameters(DEFAULT_DETECTOR_NAME, raw)
    except parameters.ParameterError as error:
        raise ConfigError(f"saturationDetector.{error.key}: {error.problem}") from None


def _policy(
    ref: object,
    path: str,
    plugins: Mapping[str, object],
    kind: type,
    types: Mapping[str, registry.PluginFactory],
    fallback: str,
) -> object:
    if ref is None:
        declared = [p for p in plugins.values() if isinstance(p, kind)]
        if len(declared) == 1:
            return declared[0]
        return types[fallback](fallback, None)
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{path}: must be a plugin name or policy type, got {ref!r}")
    plugin = plugins.get(ref)
    if plugin is not None:
        if not isinstance(plugin, kind):
            raise ConfigError(
                f"{path}: plugin {ref!r} is a {getattr(plugin, 'type_name', '?')}, not one of "
                f"{', '.join(sorted(types))}"
            )
        return plugin
    if ref in types:
        return types[ref](ref, None)
    hint = parameters.did_you_mean(ref, [*plugins, *types])
    raise ConfigError(
        f"{path}: no plugin or policy type named {ref!r}{hint}; known types: "
        f"{', '.join(sorted(types))}"
    )


def _band(raw: object, path: str, plugins: Mapping[str, object]) -> tuple[int, BandSettings]:
    with _Section(raw, path) as section:
        priority = section.integer("priority", 0)
        ordering = _policy(
            section.value("orderingPolicyRef"),
            f"{path}.orderingPolicyRef",
            plugins,
            OrderingPolicy,
            registry.ORDERING_POLICIES,
            DEFAULT_ORDERING,
        )
        fairness = _policy(
            section.value("fairnessPolicyRef"),
            f"{path}.fairnessPolicyRef",
            plugins,
            FairnessPolicy,
            registry.FAIRNESS_POLICIES,
            DEFAULT_FAIRNESS,
        )
        ceiling = section.number("saturationCeiling", 1.0)
        if not 0.0 < ceiling <= 1.0:
            raise parameters.ParameterError(
                "saturationCeiling", f"must be in (0, 1], got {ceiling}"
            )
        band = BandSettings(
            ordering=ordering,  # type: ignore[arg-type]  # checked by _policy
            fairness=fairness,  # type: ignore[arg-type]
            max_requests=section.quantity("maxRequests"),
            max_bytes=section.quantity("maxBytes"),
            saturation_ceiling=ceiling,
        )
    return priority, band


def settings(
    raw: Mapping[str, object] | None,
    detector: SaturationDetector,
    plugins: Mapping[str, object],
) -> FlowControlSettings:
    """Validate the `flowControl` section; ConfigError names the path and the problem."""
    with _Section(raw, "flowControl") as top:
        raw_bands = top.value("priorityBands")
        if raw_bands is not None and not isinstance(raw_bands, list):
            raise ConfigError(f"flowControl.priorityBands: must be a list, got {raw_bands!r}")
        bands: dict[int, BandSettings] = {}
        for i, raw_band in enumerate(raw_bands or []):
            priority, band = _band(raw_band, f"flowControl.priorityBands[{i}]", plugins)
            if priority in bands:
                raise ConfigError(
                    f"flowControl.priorityBands[{i}].priority: {priority} is configured twice"
                )
            bands[priority] = band
        _, default_band = _band(
            top.value("defaultPriorityBand"), "flowControl.defaultPriorityBand", plugins
        )
        retry_after = top.duration("retryAfter", 1.0)
        result = FlowControlSettings(
            detector=detector,
            default_band=default_band,
            bands=bands,
            max_requests=top.quantity("maxRequests"),
            max_bytes=top.quantity("maxBytes"),
            default_request_ttl_s=top.duration("defaultRequestTTL", 0.0),
            retry_after_s=max(1, math.ceil(retry_after)),
            dispatch_poll_interval_s=top.duration("dispatchPollInterval", 0.01, positive=True),
            workload=_workload_settings([default_band, *bands.values()], plugins),
        )
    return result


def _workload_settings(
    bands: list[BandSettings], plugins: Mapping[str, object]
) -> plan.WorkloadAwareSettings:
    """The workload plan's settings (registry window, idle timeout, default criticality)
    come from the workload-aware policy in use, else from the one declared."""
    for policy in [b.ordering for b in bands] + list(plugins.values()):
        if isinstance(policy, workload_aware.WorkloadAwareOrderingPolicy):
            return policy.settings
    return plan.WorkloadAwareSettings()
