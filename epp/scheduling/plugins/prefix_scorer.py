"""`prefix-cache-scorer`: matched blocks / total blocks, from a prefix producer's data.

By default it reads the data of the producer named `approx-prefix-cache-producer`
(parameter `prefixMatchInfoProducerName` names another); the config loader adds that
producer to the profile, creating a default one when none is declared. Without producer
data for the request (short prompt, producer not run) every candidate scores 0.

Upstream's older `prefix-cache-scorer` was one plugin that indexed and scored. Giving this
scorer any of the producer's parameters (`blockSizeTokens`, `maxPrefixBlocksToMatch`,
`lruCapacityPerServer`, `autoTune`, or the old `blockSize`/`hashBlockSize` in characters)
selects that form: a `SelfIndexingPrefixCacheScorer` that is its own producer.

Known weakness of upstream's formula: the score is relative to the prompt's
length, so a short prompt fully cached scores 1.0, as high as a long one. Every short
prompt sharing a little (a system prompt of one block) then pulls hard towards the one
endpoint that saw it first, and that endpoint hot-spots although there is almost nothing
to reuse. Parameter `minBlocksForFullScore` N (default 0: upstream's formula) scores
`matched / max(total, N)`: a match counts in full only when it is at least N blocks long,
so a one-block match among short prompts weighs 1/N and the load scorers decide, while
long prompts (total >= N) score exactly as before. bench/scheduling_cost.py `--hotspot`
measures it (figures in bench/README.md): with fresh metrics N = 8 cuts requests queued
beside a free slot 5-7x; with 50 ms-old metrics the load scorers then herd short prompts
onto one endpoint per scrape interval, which `queue-scorer`'s `countPendingDispatches`
removes. Off by default (upstream's formula); use it together with that parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from epp import parameters
from epp.datastore.snapshot import EndpointKey
from epp.scheduling.interfaces import Candidate, SchedulingRequest, SchedulingResult
from epp.scheduling.plugins.prefix_producer import (
    ApproxPrefixCacheProducer,
    PrefixMatch,
    PrefixSettings,
)

_PRODUCER_KEYS = (
    "blockSizeTokens",
    "blockSize",
    "hashBlockSize",
    "maxPrefixBlocksToMatch",
    "lruCapacityPerServer",
    "autoTune",
)


def _scores(data: object, candidates: Sequence[Candidate], min_full_blocks: int) -> list[float]:
    if not isinstance(data, PrefixMatch) or not data.hashes:
        return [0.0] * len(candidates)
    matched = data.matched_blocks
    if not matched:
        return [0.0] * len(candidates)
    total = max(len(data.hashes), min_full_blocks)
    return [matched.get(c.endpoint.key, 0) / total for c in candidates]


class PrefixCacheScorer:
    type_name = "prefix-cache-scorer"

    def __init__(
        self,
        name: str = type_name,
        producer_name: str = ApproxPrefixCacheProducer.type_name,
        *,
        min_blocks_for_full_score: int = 0,
    ) -> None:
        self.name = name
        self.required_producer = producer_name
        self.min_blocks_for_full_score = min_blocks_for_full_score
        """Name of the data producer this scorer reads; the loader wires it into profiles."""

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> PrefixCacheScorer | SelfIndexingPrefixCacheScorer:
        reader = parameters.ParameterReader(params)
        producer_name = reader.string(
            "prefixMatchInfoProducerName", ApproxPrefixCacheProducer.type_name
        )
        min_full = reader.integer("minBlocksForFullScore", 0, minimum=0)
        self_indexing = [k for k in _PRODUCER_KEYS if reader.has(k)]
        settings = PrefixSettings.read(reader, legacy=True)
        reader.finish()
        if not self_indexing:
            return cls(name, producer_name, min_blocks_for_full_score=min_full)
        if reader.has("prefixMatchInfoProducerName"):
            raise parameters.ParameterError(
                self_indexing[0],
                "a prefix-cache-scorer either reads a producer "
                "('prefixMatchInfoProducerName') or indexes by itself (producer parameters), "
                "not both",
            )
        return SelfIndexingPrefixCacheScorer(name, settings, min_blocks_for_full_score=min_full)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return _scores(
            request.plugin_data.get(self.required_producer),
            candidates,
            self.min_blocks_for_full_score,
        )


class SelfIndexingPrefixCacheScorer:
    """The combined form: a prefix scorer that also is its own approximate prefix producer."""

    type_name = PrefixCacheScorer.type_name

    def __init__(
        self,
        name: str = type_name,
        settings: PrefixSettings | None = None,
        *,
        min_blocks_for_full_score: int = 0,
    ) -> None:
        self.name = name
        self.required_producer = name
        self.min_blocks_for_full_score = min_blocks_for_full_score
        self._producer = ApproxPrefixCacheProducer(name, settings)

    @property
    def settings(self) -> PrefixSettings:
        return self._producer.settings

    @property
    def producer(self) -> ApproxPrefixCacheProducer:
        return self._producer

    def same_settings(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and other.settings == self.settings
            and other.min_blocks_for_full_score == self.min_blocks_for_full_score
        )

    def produce(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> None:
        self._producer.produce(request, candidates)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return _scores(
            request.plugin_data.get(self.name), candidates, self.min_blocks_for_full_score
        )

    def pre_request(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        self._producer.pre_request(request, result)

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        self._producer.retain(keys)
