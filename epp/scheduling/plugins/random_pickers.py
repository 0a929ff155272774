"""`random-picker` and `weighted-random-picker`: spread load instead of always taking the top.

`random-picker` ignores scores and draws up to `maxNumOfEndpoints` candidates uniformly
without replacement. `weighted-random-picker` draws in proportion to the total scores with
A-Res reservoir keys (Efraimidis & Spirakis): each candidate gets key U^(1/w) for a uniform
U in (0, 1) and the N largest keys win, which is weighted sampling without replacement in
one pass. Candidates with score 0 are drawn only after every positive-score candidate; when
all scores are 0 (or not finite) the draw is uniform.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from epp.scheduling.interfaces import Candidate, ProfileResult, SchedulingRequest
from epp.scheduling.plugins import parameters


def _read_max_endpoints(params: Mapping[str, object] | None) -> int:
    reader = parameters.ParameterReader(params)
    max_endpoints = reader.integer("maxNumOfEndpoints", 1, minimum=1)
    reader.finish()
    return max_endpoints


class RandomPicker:
    type_name = "random-picker"

    def __init__(
        self, name: str = type_name, *, max_endpoints: int = 1, rng: random.Random | None = None
    ) -> None:
        if max_endpoints < 1:
            raise ValueError(f"maxNumOfEndpoints must be at least 1, got {max_endpoints}")
        self.name = name
        self.max_endpoints = max_endpoints
        self._rng = rng if rng is not None else random.Random()

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> RandomPicker:
        return cls(name, max_endpoints=_read_max_endpoints(params))

    def pick(
        self,
        request: SchedulingRequest,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
    ) -> ProfileResult:
        count = min(self.max_endpoints, len(candidates))
        if count == 0:
            return ProfileResult(())
        if count == 1:
            return ProfileResult((candidates[self._rng.randrange(len(candidates))],))
        return ProfileResult(tuple(self._rng.sample(list(candidates), count)))


class WeightedRandomPicker:
    type_name = "weighted-random-picker"

    def __init__(
        self, name: str = type_name, *, max_endpoints: int = 1, rng: random.Random | None = None
    ) -> None:
        if max_endpoints < 1:
            raise ValueError(f"maxNumOfEndpoints must be at least 1, got {max_endpoints}")
        self.name = name
        self.max_endpoints = max_endpoints
        self._rng = rng if rng is not None else random.Random()

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> WeightedRandomPicker:
        return cls(name, max_endpoints=_read_max_endpoints(params))

    def pick(
        self,
        request: SchedulingRequest,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
    ) -> ProfileResult:
        count = len(candidates)
        if count == 0:
            return ProfileResult(())
        rand = self._rng.random
        keys: list[float] = []
        for score in scores:
            if score > 0.0 and math.isfinite(score):
                u = rand() or 5e-324  # U in (0, 1): 0 would tie every weight at key 0
                keys.append(u ** (1.0 / score))
            else:
                # Below every positive-weight key (those are > 0), still random among zeros.
                keys.append(-1.0 - rand())
        if self.max_endpoints == 1:
            best = max(range(count), key=keys.__getitem__)
            return ProfileResult((candidates[best],))
        order = sorted(range(count), key=keys.__getitem__, reverse=True)
        return ProfileResult(tuple(candidates[i] for i in order[: self.max_endpoints]))
