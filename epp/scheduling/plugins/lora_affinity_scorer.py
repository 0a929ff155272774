"""`lora-affinity-scorer`: prefer endpoints that already serve (or can load) the adapter.

Scores, first match wins (upstream semantics):

* 1.0 the requested model is a running adapter;
* 0.8 there is room for one more adapter: running + waiting adapters < max adapters
  (upstream counts waiting adapters as taking a slot, so this is checked before 'waiting');
* 0.6 the adapter is waiting to be loaded;
* 0.0 otherwise, and for stale candidates.

For a base-model request on servers without LoRA (max adapters 0) every endpoint scores 0,
which leaves the ranking to the other scorers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epp import parameters
from epp.scheduling.interfaces import Candidate, SchedulingRequest


class LoraAffinityScorer:
    type_name = "lora-affinity-scorer"

    def __init__(self, name: str = type_name) -> None:
        self.name = name

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> LoraAffinityScorer:
        parameters.ParameterReader(params).finish()
        return cls(name)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        model = request.target_model
        scores: list[float] = []
        for candidate in candidates:
            m = candidate.metrics
            if candidate.stale:
                scores.append(0.0)
            elif model in m.running_adapters:
                scores.append(1.0)
            elif len(m.running_adapters) + len(m.waiting_adapters) < m.max_adapters:
                scores.append(0.8)
            elif model in m.waiting_adapters:
                scores.append(0.6)
            else:
                scores.append(0.0)
        return scores
