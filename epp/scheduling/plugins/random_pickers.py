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
from collections.abc import Sequence

from epp.scheduling.interfaces import Candidate, ProfileResult, SchedulingRequest
from epp.scheduling.plugins import picker_base


class RandomPicker(picker_base.CountedPicker):
    type_name = "random-picker"

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


class WeightedRandomPicker(picker_base.CountedPicker):
    type_name = "weighted-random-picker"

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
