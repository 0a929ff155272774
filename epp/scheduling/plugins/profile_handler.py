"""Profile handlers: which profiles a scheduling cycle runs and whose result is primary.

* `single-profile-handler`: runs the only profile once; its result is the primary one.
* `multi-profile-handler`: runs every profile once, in config order, in one pass, so
  secondary profiles can compute results a later stage reads (a fallback set, a shadow
  choice to compare against, a prefill endpoint). The primary profile is `primaryProfile`
  (default: the first configured). With `fallback: true` (default false), when the
  primary profile found no endpoint the first other profile that did becomes primary,
  e.g. a strict profile with a filter and a permissive one behind it.

The loader calls `check_profiles(names)` with the configured profile names so a handler
rejects a config it cannot run before any request does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epp import parameters
from epp.scheduling.interfaces import ProfileResult, SchedulingRequest, SchedulingResult


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

    def check_profiles(self, names: Sequence[str]) -> None:
        if len(names) != 1:
            raise ValueError(
                f"single-profile-handler runs exactly one profile, but {len(names)} are "
                f"configured: {', '.join(names)}; use multi-profile-handler for several"
            )

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


class MultiProfileHandler:
    type_name = "multi-profile-handler"

    def __init__(
        self, name: str = type_name, *, primary_profile: str | None = None, fallback: bool = False
    ) -> None:
        self.name = name
        self.primary_profile = primary_profile
        self.fallback = fallback

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> MultiProfileHandler:
        reader = parameters.ParameterReader(params)
        primary = reader.string("primaryProfile", "") or None
        fallback = reader.boolean("fallback", False)
        reader.finish()
        return cls(name, primary_profile=primary, fallback=fallback)

    def check_profiles(self, names: Sequence[str]) -> None:
        if self.primary_profile is not None and self.primary_profile not in names:
            hint = parameters.did_you_mean(self.primary_profile, names)
            raise parameters.ParameterError(
                "primaryProfile",
                f"no scheduling profile named {self.primary_profile!r}{hint}; "
                f"profiles: {', '.join(names)}",
            )

    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, object],
        results_so_far: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        return [] if results_so_far else list(profiles)

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        primary = self.primary_profile or next(iter(results), "")
        if self.fallback and results.get(primary) is None:
            for name, result in results.items():
                if result is not None and result.targets:
                    primary = name
                    break
        return SchedulingResult(profile_results=results, primary_profile=primary)
