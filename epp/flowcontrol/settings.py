"""Flow control's settings as validated values: bands with their policies and limits, the
saturation detector, TTLs. `epp.config.flow_control` builds them from the `flowControl`
section of an `EndpointPickerConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from epp.flowcontrol import plan
from epp.flowcontrol.interfaces import FairnessPolicy, OrderingPolicy, SaturationDetector

FEATURE_GATE = "flowControl"


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
