"""`in-flight-tracker`: requests routed and not yet ended, per endpoint.

A lifecycle plugin (pre-request takes, response-complete gives back) that every config
carries, declared or not. Its counts are what the demo's live view shows and what tests
check to prove that every request releases its slot exactly once: nothing clamps them, so
a release that happened twice, or never, stays visible as a count that does not return
to zero. The instance has no parameters, so a config reload keeps it, counts and all.
"""

from __future__ import annotations

from collections.abc import Mapping

from epp import parameters
from epp.datastore.snapshot import EndpointKey
from epp.requestcontrol.interfaces import ResponseSummary
from epp.scheduling.interfaces import Candidate, SchedulingRequest, SchedulingResult


class InFlightTracker:
    type_name = "in-flight-tracker"

    def __init__(self, name: str = type_name) -> None:
        self.name = name
        self.in_flight = 0
        self.per_endpoint: dict[EndpointKey, int] = {}

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> InFlightTracker:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def same_settings(self, other: object) -> bool:
        return type(other) is type(self)

    def pre_request(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        primary = result.primary
        if primary is None or not primary.targets:
            return
        key = primary.targets[0].endpoint.key
        self.in_flight += 1
        self.per_endpoint[key] = self.per_endpoint.get(key, 0) + 1

    def response_complete(
        self, request: SchedulingRequest, target: Candidate, response: ResponseSummary
    ) -> None:
        key = target.endpoint.key
        self.in_flight -= 1
        left = self.per_endpoint.get(key, 0) - 1
        if left:
            self.per_endpoint[key] = left  # negative stays: a double release must show
        else:
            del self.per_endpoint[key]

    def is_idle(self) -> bool:
        return self.in_flight == 0 and not self.per_endpoint
