"""The workload plan's settings: the score formula's weights and caps, and the registry's
window, cleanup and idle timeout (`workload-aware-ordering-policy` parameters)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from epp import parameters
from epp.flowcontrol.workload import DEFAULT_CRITICALITY, MAX_CRITICALITY


@dataclass(frozen=True, slots=True)
class WorkloadAwareSettings:
    wait_weight: float = 0.4
    criticality_weight: float = 0.4
    rate_weight: float = 0.2
    wait_time_cap_s: float = 60.0
    request_rate_cap: float = 100.0
    sliding_window_s: float = 60.0
    cleanup_interval_s: float = 300.0
    idle_timeout_s: float = 300.0
    default_criticality: int = DEFAULT_CRITICALITY


def score(settings: WorkloadAwareSettings, wait_s: float, criticality: int, rate: float) -> float:
    """The formula itself, for one item (the queue never calls this per item)."""
    return (
        settings.wait_weight * min(wait_s / settings.wait_time_cap_s, 1.0)
        + settings.criticality_weight * criticality / MAX_CRITICALITY
        - settings.rate_weight * min(rate / settings.request_rate_cap, 1.0)
    )


def parse(params: Mapping[str, object] | None) -> WorkloadAwareSettings:
    reader = parameters.ParameterReader(params)
    defaults = WorkloadAwareSettings()
    weights_raw = reader.value("weights")
    weights = parameters.ParameterReader(_mapping(weights_raw, "weights"))
    try:
        wait_w = weights.number("waitTime", defaults.wait_weight, minimum=0.0)
        crit_w = weights.number("criticality", defaults.criticality_weight, minimum=0.0)
        rate_w = weights.number("requestRate", defaults.rate_weight, minimum=0.0)
        weights.finish()
    except parameters.ParameterError as error:
        raise parameters.ParameterError(f"weights.{error.key}", error.problem) from None
    settings = WorkloadAwareSettings(
        wait_weight=wait_w,
        criticality_weight=crit_w,
        rate_weight=rate_w,
        wait_time_cap_s=reader.duration("waitTimeCap", defaults.wait_time_cap_s, positive=True),
        request_rate_cap=reader.number("requestRateCap", defaults.request_rate_cap, minimum=0.0),
        sliding_window_s=reader.duration(
            "slidingWindowDuration", defaults.sliding_window_s, positive=True
        ),
        cleanup_interval_s=reader.duration(
            "cleanupInterval", defaults.cleanup_interval_s, positive=True
        ),
        idle_timeout_s=reader.duration("idleTimeout", defaults.idle_timeout_s, positive=True),
        default_criticality=reader.integer(
            "defaultCriticality", defaults.default_criticality, minimum=1, maximum=MAX_CRITICALITY
        ),
    )
    reader.finish()
    if settings.request_rate_cap <= 0:
        raise parameters.ParameterError("requestRateCap", "must be greater than 0")
    return settings


def _mapping(value: object, key: str) -> Mapping[str, object] | None:
    if value is None or isinstance(value, Mapping):
        return value
    raise parameters.ParameterError(key, f"must be a mapping, got {value!r}")
