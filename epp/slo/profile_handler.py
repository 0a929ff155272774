"""`slo-profile-handler`: requests with latency objectives run the SLO profile, the rest
the default one.

A request runs `sloProfile` (default `slo-aware`) when it carries an objective
(`x-slo-ttft-ms` / `x-slo-tpot-ms`, or its WorkloadClass's `spec.slo`) and the latency
predictor (`predictorName`, default `latency-predictor`) is warm; otherwise it runs
`defaultProfile` (default `default`). Which profile served each request is counted in
`inference_extension_scheduler_profile_total{profile}`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from epp import parameters
from epp.scheduling.interfaces import ProfileResult, SchedulingRequest, SchedulingResult
from epp.slo.predictor import LatencyPredictor

PluginLookup = Callable[[str, type], object]


class SloProfileHandler:
    type_name = "slo-profile-handler"

    def __init__(
        self,
        name: str = type_name,
        *,
        slo_profile: str = "slo-aware",
        default_profile: str = "default",
        predictor_name: str = LatencyPredictor.type_name,
    ) -> None:
        self.name = name
        self.slo_profile = slo_profile
        self.default_profile = default_profile
        self.predictor_name = predictor_name
        self.predictor: LatencyPredictor | None = None

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> SloProfileHandler:
        reader = parameters.ParameterReader(params)
        handler = cls(
            name,
            slo_profile=reader.string("sloProfile", "slo-aware"),
            default_profile=reader.string("defaultProfile", "default"),
            predictor_name=reader.string("predictorName", LatencyPredictor.type_name),
        )
        reader.finish()
        return handler

    def bind(self, lookup: PluginLookup) -> None:
        predictor = lookup(self.predictor_name, LatencyPredictor)
        assert isinstance(predictor, LatencyPredictor)
        self.predictor = predictor

    def check_profiles(self, names: Sequence[str]) -> None:
        wanted = (("sloProfile", self.slo_profile), ("defaultProfile", self.default_profile))
        for key, profile in wanted:
            if profile not in names:
                hint = parameters.did_you_mean(profile, names)
                raise parameters.ParameterError(
                    key,
                    f"no scheduling profile named {profile!r}{hint}; profiles: {', '.join(names)}",
                )

    def wants_slo_profile(self, request: SchedulingRequest) -> bool:
        predictor = self.predictor
        return request.slo is not None and predictor is not None and predictor.warm

    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, object],
        results_so_far: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        if results_so_far:
            return []
        return [self.slo_profile if self.wants_slo_profile(request) else self.default_profile]

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        (profile,) = results
        return SchedulingResult(results, profile)
