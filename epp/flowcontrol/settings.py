"""The `flowControl` and `saturationDetector` config sections, validated into settings.

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

A policy ref names a plugin declared under `plugins:` (so it can carry parameters) or a
policy type (used with default parameters). When exactly one ordering (or fairness)
policy is declared under `plugins:`, bands that name none use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epp import parameters
from epp.config import quantities
from epp.flowcontrol import fairness, ordering, plan, saturation, workload_aware
from epp.flowcontrol.interfaces import FairnessPolicy, OrderingPolicy, SaturationDetector

if TYPE_CHECKING:
    from epp.config.loader import PickerConfig

FEATURE_GATE = "flowControl"

_ORDERING: dict[str, Callable[[str, Mapping[str, object] | None], OrderingPolicy]] = {
    "fcfs-ordering-policy": ordering.FcfsOrderingPolicy.from_parameters,
    "edf-ordering-policy": ordering.EdfOrderingPolicy.from_parameters,
    "workload-aware-ordering-policy": workload_aware.WorkloadAwareOrderingPolicy.from_parameters,
}
_FAIRNESS: dict[str, Callable[[str, Mapping[str, object] | None], FairnessPolicy]] = {
    "global-strict-fairness-policy": fairness.GlobalStrictFairnessPolicy.from_parameters,
    "round-robin-fairness-policy": fairness.RoundRobinFairnessPolicy.from_parameters,
}
DEFAULT_ORDERING = "fcfs-ordering-policy"
DEFAULT_FAIRNESS = "global-strict-fairness-policy"


@dataclass(frozen=True, slots=True)
class BandSettings:
    ordering: OrderingPolicy
    fairness: FairnessPolicy
    max_requests: int = 0  # 0: no limit
    max_bytes: int = 0
    saturation_ceiling: float = 1.0


@dataclass(frozen=True, slots=True)
class FlowControlSettings:
    detector: SaturationDetector
    default_band: BandSettings
    bands: Mapping[int, BandSettings] = field(default_factory=dict)
    max_requests: int = 0
    max_bytes: int = 0
    default_request_ttl_s: float = 0.0  # 0: no TTL
    retry_after_s: int = 1
    dispatch_poll_interval_s: float = 0.01
    workload: plan.WorkloadAwareSettings = field(default_factory=plan.WorkloadAwareSettings)

    def band(self, priority: int) -> BandSettings:
        return self.bands.get(priority, self.default_band)


def from_config(config: PickerConfig) -> FlowControlSettings | None:
    """The settings of a loaded config; None when the flowControl gate is off."""
    if not config.feature_enabled(FEATURE_GATE):
        return None
    return parse(config.flow_control, config.saturation_detector, config.plugins)


def default_settings() -> FlowControlSettings:
    return parse(None, None, {})


class _Section:
    """Strict key reading with config paths in every message."""

    def __init__(self, raw: object, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: must be a mapping, got {raw!r}")
        self.raw: Mapping[str, object] = raw
        self.path = path
        self.used: set[str] = set()

    def get(self, key: str) -> object:
        self.used.add(key)
        return self.raw.get(key)

    def quantity(self, key: str) -> int:
        value = self.get(key)
        if value is None:
            return 0
        try:
            return quantities.parse_quantity(value, f"{self.path}.{key}")  # type: ignore[arg-type]
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None

    def duration(self, key: str, default: float) -> float:
        value = self.get(key)
        if value is None:
            return default
        try:
            return quantities.parse_duration(value, f"{self.path}.{key}")  # type: ignore[arg-type]
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None

    def finish(self) -> None:
        for key in self.raw:
            if key not in self.used:
                hint = parameters.did_you_mean(str(key), sorted(self.used))
                raise ValueError(
                    f"{self.path}: unknown key {key!r}{hint}; known keys: "
                    f"{', '.join(sorted(self.used))}"
                )


def _declared(plugins: Mapping[str, object], kind: type) -> list[object]:
    return [p for p in plugins.values() if isinstance(p, kind)]


def _policy(
    ref: object,
    path: str,
    plugins: Mapping[str, object],
    kind: type,
    types: Mapping[str, Callable[[str, Mapping[str, object] | None], object]],
    fallback: str,
) -> object:
    if ref is None:
        declared = _declared(plugins, kind)
        if len(declared) == 1:
            return declared[0]
        return types[fallback](fallback, None)
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{path}: must be a plugin name or policy type, got {ref!r}")
    plugin = plugins.get(ref)
    if plugin is not None:
        if not isinstance(plugin, kind):
            raise ValueError(
                f"{path}: plugin {ref!r} is a {getattr(plugin, 'type_name', '?')}, not one of "
                f"{', '.join(sorted(types))}"
            )
        return plugin
    if ref in types:
        return types[ref](ref, None)
    hint = parameters.did_you_mean(ref, [*plugins, *types])
    raise ValueError(
        f"{path}: no plugin or policy type named {ref!r}{hint}; known types: "
        f"{', '.join(sorted(types))}"
    )


def _band(raw: object, path: str, plugins: Mapping[str, object]) -> tuple[int, BandSettings]:
    section = _Section(raw, path)
    priority_raw = section.get("priority")
    order = _policy(
        section.get("orderingPolicyRef"),
        f"{path}.orderingPolicyRef",
        plugins,
        OrderingPolicy,
        _ORDERING,
        DEFAULT_ORDERING,
    )
    fair = _policy(
        section.get("fairnessPolicyRef"),
        f"{path}.fairnessPolicyRef",
        plugins,
        FairnessPolicy,
        _FAIRNESS,
        DEFAULT_FAIRNESS,
    )
    ceiling_raw = section.get("saturationCeiling")
    ceiling = 1.0
    if ceiling_raw is not None:
        if isinstance(ceiling_raw, bool) or not isinstance(ceiling_raw, int | float):
            raise ValueError(f"{path}.saturationCeiling: must be a number, got {ceiling_raw!r}")
        ceiling = float(ceiling_raw)
        if not 0.0 < ceiling <= 1.0:
            raise ValueError(f"{path}.saturationCeiling: must be in (0, 1], got {ceiling_raw}")
    band = BandSettings(
        ordering=order,  # type: ignore[arg-type]
        fairness=fair,  # type: ignore[arg-type]
        max_requests=section.quantity("maxRequests"),
        max_bytes=section.quantity("maxBytes"),
        saturation_ceiling=ceiling,
    )
    priority = 0
    if priority_raw is not None:
        if isinstance(priority_raw, bool) or not isinstance(priority_raw, int):
            raise ValueError(f"{path}.priority: must be an integer, got {priority_raw!r}")
        priority = priority_raw
    section.finish()
    return priority, band


def _detector(
    raw: Mapping[str, object] | None, plugins: Mapping[str, object]
) -> SaturationDetector:
    if raw is not None and "pluginRef" in raw:
        extra = sorted(set(raw) - {"pluginRef"})
        if extra:
            raise ValueError(
                f"saturationDetector: give either pluginRef or parameters, not both ({extra[0]!r})"
            )
        ref = raw["pluginRef"]
        plugin = plugins.get(ref) if isinstance(ref, str) else None
        if not isinstance(plugin, SaturationDetector):
            raise ValueError(
                f"saturationDetector.pluginRef: {ref!r} is not a declared utilization-detector"
            )
        return plugin
    try:
        return saturation.UtilizationDetector.from_parameters("saturation-detector", raw)
    except parameters.ParameterError as error:
        raise ValueError(f"saturationDetector.{error.key}: {error.problem}") from None


def parse(
    section: Mapping[str, object] | None,
    saturation_section: Mapping[str, object] | None,
    plugins: Mapping[str, object],
) -> FlowControlSettings:
    """Validate the sections; `ValueError` names the path and the problem."""
    top = _Section(section, "flowControl")
    bands: dict[int, BandSettings] = {}
    raw_bands = top.get("priorityBands")
    if raw_bands is not None and not isinstance(raw_bands, list):
        raise ValueError(f"flowControl.priorityBands: must be a list, got {raw_bands!r}")
    for i, raw in enumerate(raw_bands or []):
        priority, band = _band(raw, f"flowControl.priorityBands[{i}]", plugins)
        if priority in bands:
            raise ValueError(
                f"flowControl.priorityBands[{i}].priority: {priority} is configured twice"
            )
        bands[priority] = band
    _, default_band = _band(
        top.get("defaultPriorityBand"), "flowControl.defaultPriorityBand", plugins
    )
    ttl = top.duration("defaultRequestTTL", 0.0)
    retry_after = top.duration("retryAfter", 1.0)
    poll = top.duration("dispatchPollInterval", 0.01)
    if poll <= 0:
        raise ValueError("flowControl.dispatchPollInterval: must be positive")
    settings = FlowControlSettings(
        detector=_detector(saturation_section, plugins),
        default_band=default_band,
        bands=bands,
        max_requests=top.quantity("maxRequests"),
        max_bytes=top.quantity("maxBytes"),
        default_request_ttl_s=ttl,
        retry_after_s=max(1, math.ceil(retry_after)),
        dispatch_poll_interval_s=poll,
        workload=_workload_settings([default_band, *bands.values()], plugins),
    )
    top.finish()
    return settings


def _workload_settings(
    bands: list[BandSettings], plugins: Mapping[str, object]
) -> plan.WorkloadAwareSettings:
    """The workload plan's settings (registry window, idle timeout, default criticality)
    come from the workload-aware policy in use, else from the one declared."""
    candidates = [b.ordering for b in bands] + list(plugins.values())
    for policy in candidates:
        if isinstance(policy, workload_aware.WorkloadAwareOrderingPolicy):
            return policy.settings
    return plan.WorkloadAwareSettings()
