"""The scheduling cycle: profiles of filters, weighted scorers and a picker, run by a handler.

`Scheduler.schedule` is the only entry the request path needs for choosing endpoints:

    handler.pick_profiles -> for each picked profile:
        data producers (each at most once per cycle) -> filters in order (an empty result
        ends the profile with no result) -> scorers (each score clamped to [0, 1], total =
        sum of score x weight) -> picker
    -> handler.process_results (chooses the primary profile)

"No endpoint" is not an exception: when every candidate was filtered out (or there were
none), `SchedulingResult.primary` is None and the caller answers 503. A plugin that raises
during scheduling propagates; that is a bug to see, not a routing outcome.

What happens after a target is chosen (recording it, releasing it when the request ends)
belongs to the request lifecycle's own extension points (`epp.requestcontrol`), not to the
scheduler.

Timing: each plugin call is measured with one `perf_counter()` read (the end of one call is
the start of the next) and the durations are recorded after the cycle, so recording
metrics never lands inside another plugin's measurement. Scores travel as lists aligned
with the candidate sequence; no per-endpoint mappings are built on the hot path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter

from prometheus_client import Counter

from epp import metrics
from epp.scheduling.interfaces import (
    Candidate,
    DataPreparer,
    DataProducer,
    Filter,
    Picker,
    Plugin,
    ProfileHandler,
    ProfileResult,
    SchedulingRequest,
    SchedulingResult,
    Scorer,
)

logger = logging.getLogger(__name__)

# A plugin's metric labels (extension point, type, name) and the seconds one call took.
_Timing = tuple[tuple[str, str, str], float]


def _labels(extension_point: str, plugin: Plugin) -> tuple[str, str, str]:
    return (extension_point, plugin.type_name, plugin.name)


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float = 1.0


class SchedulingProfile:
    """One named way of choosing endpoints: producers, filters, weighted scorers, a picker."""

    def __init__(
        self,
        name: str,
        *,
        picker: Picker,
        filters: Sequence[Filter] = (),
        scorers: Sequence[WeightedScorer | tuple[Scorer, float]] = (),
        producers: Sequence[DataProducer] = (),
    ) -> None:
        self.name = name
        self.picker = picker
        self.filters: tuple[Filter, ...] = tuple(filters)
        self.scorers: tuple[WeightedScorer, ...] = tuple(
            s if isinstance(s, WeightedScorer) else WeightedScorer(s[0], float(s[1]))
            for s in scorers
        )
        for weighted in self.scorers:
            if not (math.isfinite(weighted.weight) and weighted.weight >= 0.0):
                raise ValueError(
                    f"profile {name!r}: scorer {weighted.scorer.name!r} has weight "
                    f"{weighted.weight}; weights must be finite numbers >= 0"
                )
        self.producers: tuple[DataProducer, ...] = tuple(producers)
        # Labels resolved once, so the hot path does no attribute lookups for metrics.
        self._producer_steps = [(p, _labels("PrepareData", p)) for p in self.producers]
        self._filter_steps = [(f, _labels("Filter", f)) for f in self.filters]
        self._scorer_steps = [
            (w.scorer, w.weight, _labels("Scorer", w.scorer)) for w in self.scorers
        ]
        self._picker_labels = _labels("Picker", picker)

    def __repr__(self) -> str:
        return (
            f"SchedulingProfile({self.name!r}, filters={[f.name for f in self.filters]}, "
            f"scorers={[(w.scorer.name, w.weight) for w in self.scorers]}, "
            f"producers={[p.name for p in self.producers]}, picker={self.picker.name!r})"
        )

    def _run(
        self,
        request: SchedulingRequest,
        candidates: Sequence[Candidate],
        start: float,
        produced: set[int],
        timings: list[_Timing],
    ) -> tuple[ProfileResult | None, float]:
        t = start
        for producer, labels in self._producer_steps:
            if id(producer) in produced:
                continue
            produced.add(id(producer))
            producer.produce(request, candidates)
            now = perf_counter()
            timings.append((labels, now - t))
            t = now

        for filter_, labels in self._filter_steps:
            candidates = filter_.filter(request, candidates)
            now = perf_counter()
            timings.append((labels, now - t))
            t = now
            if not candidates:
                logger.debug(
                    "profile %s: filter %s left no candidates (request %s)",
                    self.name,
                    filter_.name,
                    request.request_id,
                )
                return None, t
        if not candidates:
            return None, t

        count = len(candidates)
        totals = [0.0] * count
        for scorer, weight, labels in self._scorer_steps:
            scores = scorer.score(request, candidates)
            if len(scores) != count:
                raise ValueError(
                    f"scorer {scorer.name!r} returned {len(scores)} scores for {count} candidates"
                )
            for i, score in enumerate(scores):
                # `not score >= 0.0` also catches NaN.
                if score > 1.0:
                    score = 1.0
                elif not score >= 0.0:
                    score = 0.0
                totals[i] += score * weight
            now = perf_counter()
            timings.append((labels, now - t))
            t = now

        result = self.picker.pick(request, candidates, totals)
        now = perf_counter()
        timings.append((self._picker_labels, now - t))
        if not result.targets:
            return None, now
        return result, now


class Scheduler:
    """Runs scheduling cycles over a fixed set of profiles; immutable once built."""

    def __init__(
        self,
        profiles: Mapping[str, SchedulingProfile],
        handler: ProfileHandler,
    ) -> None:
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        for key, profile in profiles.items():
            if key != profile.name:
                raise ValueError(f"profile registered as {key!r} is named {profile.name!r}")
        self.profiles: Mapping[str, SchedulingProfile] = dict(profiles)
        self.handler = handler
        preparers: list[DataPreparer] = []
        for profile in self.profiles.values():
            for producer in profile.producers:
                if isinstance(producer, DataPreparer) and producer not in preparers:
                    preparers.append(producer)
        self.preparers: tuple[DataPreparer, ...] = tuple(preparers)
        self._pick_labels = _labels("ProfilePicker", handler)
        self._process_labels = _labels("ProcessProfilesResults", handler)
        self._served: dict[str, Counter] = {}

    async def prepare(self, request: SchedulingRequest) -> None:
        """Let producers that need it work off the loop before `schedule` (tokenizing)."""
        for preparer in self.preparers:
            await preparer.prepare(request)

    def schedule(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> SchedulingResult:
        """Choose endpoints for one request. `result.primary is None` means "none fit" (503)."""
        start = t = perf_counter()
        timings: list[_Timing] = []
        results: dict[str, ProfileResult | None] = {}
        produced: set[int] = set()
        profiles = self.profiles
        while True:
            names = self.handler.pick_profiles(request, profiles, results)
            now = perf_counter()
            timings.append((self._pick_labels, now - t))
            t = now
            if not names:
                break
            for name in names:
                profile = profiles.get(name)
                if profile is None:
                    raise ValueError(
                        f"profile handler {self.handler.name!r} picked unknown profile {name!r}"
                    )
                if name in results:
                    raise ValueError(
                        f"profile handler {self.handler.name!r} picked profile {name!r} twice"
                    )
                results[name], t = profile._run(request, candidates, t, produced, timings)

        result = self.handler.process_results(request, results)
        served = self._served.get(result.primary_profile)
        if served is None:  # profile names come from the config: a bounded set
            served = self._served[result.primary_profile] = metrics.scheduler_profile_total.labels(
                result.primary_profile
            )
        served.inc()
        end = perf_counter()
        timings.append((self._process_labels, end - t))
        metrics.observe_scheduler_duration(end - start)
        _record(timings)
        return result


def _record(timings: list[_Timing]) -> None:
    observe = metrics.observe_plugin_duration
    for (extension_point, plugin_type, plugin_name), seconds in timings:
        observe(extension_point, plugin_type, plugin_name, seconds)
