"""`max-score-picker`: the highest total score wins; ties are broken at random.

With `maxNumOfEndpoints` N > 1 it returns up to N endpoints, best first, which the request
path sends to Envoy as fallbacks. Ties are shuffled before the stable sort so equal scores
spread load instead of always favouring the first endpoint in the snapshot.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from epp.scheduling.interfaces import Candidate, ProfileResult, SchedulingRequest
from epp.scheduling.plugins import parameters


class MaxScorePicker:
    type_name = "max-score-picker"

    def __init__(
        self,
        name: str = type_name,
        *,
        max_endpoints: int = 1,
        rng: random.Random | None = None,
    ) -> None:
        if max_endpoints < 1:
            raise ValueError(f"maxNumOfEndpoints must be at least 1, got {max_endpoints}")
        self.name = name
        self.max_endpoints = max_endpoints
        self._rng = rng if rng is not None else random.Random()

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> MaxScorePicker:
        reader = parameters.ParameterReader(params)
        max_endpoints = reader.integer("maxNumOfEndpoints", 1, minimum=1)
        reader.finish()
        return cls(name, max_endpoints=max_endpoints)

    def pick(
        self,
        request: SchedulingRequest,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
    ) -> ProfileResult:
        count = len(candidates)
        if count == 0:
            return ProfileResult(())
        if self.max_endpoints == 1 or count == 1:
            best = max(scores)
            ties = [i for i, score in enumerate(scores) if score == best]
            index = ties[0] if len(ties) == 1 else self._rng.choice(ties)
            return ProfileResult((candidates[index],))
        order = list(range(count))
        self._rng.shuffle(order)
        order.sort(key=scores.__getitem__, reverse=True)  # stable: shuffled order breaks ties
        return ProfileResult(tuple(candidates[i] for i in order[: self.max_endpoints]))
