"""`single-profile-handler`: run the only profile once; its result is the primary one."""

from __future__ import annotations

from collections.abc import Mapping

from epp.scheduling.interfaces import ProfileResult, SchedulingRequest, SchedulingResult
from epp.scheduling.plugins import parameters


class SingleProfileHandler:
    type_name = "single-profile-handler"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> SingleProfileHandler:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, object],
        results_so_far: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        if results_so_far:
            return []
        if len(profiles) != 1:
            raise ValueError(
                f"{self.type_name} {self.name!r} needs exactly one profile, "
                f"got {len(profiles)}: {', '.join(profiles)}"
            )
        return list(profiles)

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        primary = next(iter(results), "")
        return SchedulingResult(profile_results=results, primary_profile=primary)
