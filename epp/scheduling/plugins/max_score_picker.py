"""`max-score-picker`: the highest total score wins; ties are broken at random.

With `maxNumOfEndpoints` N > 1 it returns up to N endpoints, best first, which the request
path sends to Envoy as fallbacks. Ties are shuffled before the stable sort so equal scores
spread load instead of always favouring the first endpoint in the snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.scheduling.interfaces import Candidate, ProfileResult, SchedulingRequest
from epp.scheduling.plugins import picker_base


class MaxScorePicker(picker_base.CountedPicker):
    type_name = "max-score-picker"

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
