"""`precise-prefix-cache-producer` and `precise-prefix-cache-scorer`: prefix affinity from
what each server reports it caches, not from what the picker guesses.

The producer tokenizes the request with its model's tokenizer (`epp.bodies.tokenizer`;
long prompts on a thread, in `prepare`, before the scheduling cycle), keys the whole
blocks of the token ids the way the block index does (`kv_block_index.chain_keys`, with
the LoRA adapter and `cache_salt`), and counts per candidate the leading blocks the
server's KV-cache events say it holds. It leaves a `PrefixMatch` under its name in
`request.plugin_data`, the same value the approximate producer leaves, so the scorer, the
latency predictor (`prefixProducerName`) and `prefix-cache-scorer` can all read it.

The index is the `kv-events-extractor`'s (parameter `kvEventsExtractorName`), which must
be wired in the data layer under a `kv-events-data-source`. It learns only from events.
Events come after the server computed a prompt, seconds after routing under load, so the
producer also counts the prompts of requests it routed that have not ended as held by
their server (`in_flight_prefixes`; parameter `inFlightPrefixes`, default true): without
that, requests of a prefix nobody had cached are scattered over the pool until the first
of them is announced.

A request whose model has no tokenizer configured (or whose body has no single prompt,
e.g. a batch of completions) is matched with an approximate index of the producer's own,
which learns from routing as `approx-prefix-cache-producer` does; the first such request
per model is logged and every one is counted in
`inference_extension_precise_prefix_approximate_total`.

Parameters: `tokenizers` (model name -> tokenizer directory), `loraAdapters` (adapter
name -> its base model, whose tokenizer it uses; the adapter name is hashed into the
blocks as vLLM does), `kvEventsExtractorName` (`kv-events-extractor`),
`maxPrefixBlocksToMatch` (1024), `inlineTokenizeChars` (512: shorter prompts are
tokenized on the loop, longer ones on a thread), `inFlightPrefixes` (true).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from epp import metrics, parameters
from epp.bodies import tokenizer as tokenizing
from epp.datalayer import kv_block_index
from epp.datalayer.kv_event_extractor import KvEventsExtractor
from epp.datastore.snapshot import EndpointKey
from epp.scheduling.interfaces import (
    CHARS_PER_TOKEN,
    Candidate,
    SchedulingRequest,
    SchedulingResult,
)
from epp.scheduling.plugins import prefix_scorer
from epp.scheduling.plugins.in_flight_prefixes import InFlightPrefixes, InFlightPrompt
from epp.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer, PrefixMatch

logger = logging.getLogger(__name__)

DEFAULT_MAX_PREFIX_BLOCKS: Final = 1024
_TOKENS_SUFFIX: Final = "/token-ids"
_FALLBACK_SUFFIX: Final = "/approximate"
_BLOCK_SIZE_SUFFIX: Final = "/block-size"
_IN_FLIGHT_SUFFIX: Final = "/in-flight"
_UNTOKENIZED: Final = object()  # prepare ran and found no prompt to tokenize


class PrecisePrefixCacheProducer:
    type_name: Final = "precise-prefix-cache-producer"

    def __init__(
        self,
        name: str = type_name,
        *,
        tokenizer_dirs: Mapping[str, str] | None = None,
        lora_adapters: Mapping[str, str] | None = None,
        extractor_name: str = KvEventsExtractor.type_name,
        max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
        inline_chars: int = tokenizing.DEFAULT_INLINE_CHARS,
        in_flight: bool = True,
    ) -> None:
        self.name = name
        self.extractor_name = extractor_name
        self.max_blocks = max_blocks
        self._settings = (
            tuple(sorted((tokenizer_dirs or {}).items())),
            tuple(sorted((lora_adapters or {}).items())),
            extractor_name,
            max_blocks,
            inline_chars,
            in_flight,
        )
        self.tokenizers = tokenizing.TokenizerPool(tokenizer_dirs, inline_chars=inline_chars)
        self._adapters = dict(lora_adapters or {})
        for adapter, base in self._adapters.items():
            if not self.tokenizers.configured(base):
                raise parameters.ParameterError(
                    "loraAdapters",
                    f"adapter {adapter!r} names base model {base!r}, which has no entry "
                    "under tokenizers",
                )
        self._index: kv_block_index.KvBlockIndex | None = None
        self._approximate = ApproxPrefixCacheProducer(name)
        self._tokens_key = name + _TOKENS_SUFFIX
        self._fallback_key = name + _FALLBACK_SUFFIX
        self._block_size_key = name + _BLOCK_SIZE_SUFFIX
        self._in_flight_key = name + _IN_FLIGHT_SUFFIX
        self.in_flight = InFlightPrefixes() if in_flight else None
        self._untokenized_models: set[str] = set()
        self._fallbacks = metrics.precise_prefix_approximate_total.labels(name)

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> PrecisePrefixCacheProducer:
        reader = parameters.ParameterReader(params)
        dirs = _string_map(reader, "tokenizers")
        adapters = _string_map(reader, "loraAdapters")
        extractor = reader.string("kvEventsExtractorName", KvEventsExtractor.type_name)
        max_blocks = reader.integer(
            "maxPrefixBlocksToMatch", DEFAULT_MAX_PREFIX_BLOCKS, minimum=1, maximum=1 << 20
        )
        inline = reader.integer("inlineTokenizeChars", tokenizing.DEFAULT_INLINE_CHARS, minimum=0)
        in_flight = reader.boolean("inFlightPrefixes", True)
        reader.finish()
        return cls(
            name,
            tokenizer_dirs=dirs,
            lora_adapters=adapters,
            extractor_name=extractor,
            max_blocks=max_blocks,
            inline_chars=inline,
            in_flight=in_flight,
        )

    def __repr__(self) -> str:
        return f"PrecisePrefixCacheProducer({self.name!r})"

    def same_settings(self, other: object) -> bool:
        return isinstance(other, PrecisePrefixCacheProducer) and other._settings == self._settings

    def bind(self, lookup: Callable[..., object]) -> None:
        """The loader hands over the extractor whose block index this producer reads."""
        extractor = lookup(self.extractor_name, KvEventsExtractor)
        assert isinstance(extractor, KvEventsExtractor)
        self._index = extractor.index

    @property
    def index(self) -> kv_block_index.KvBlockIndex:
        if self._index is None:
            raise RuntimeError(f"producer {self.name!r} is not bound to a kv-events-extractor")
        return self._index

    def _base_of(self, model: str) -> tuple[str, str | None]:
        """The model whose tokenizer `model` uses, and its LoRA adapter (None: base)."""
        base = self._adapters.get(model)
        return (base, model) if base is not None else (model, None)

    async def prepare(self, request: SchedulingRequest) -> None:
        base, _ = self._base_of(request.target_model)
        if request.body is None or not self.tokenizers.configured(base):
            return
        tokenizer = await self.tokenizers.load(base)
        if tokenizer is None:
            return
        ids = await self.tokenizers.token_ids(tokenizer, request.body)
        request.plugin_data[self._tokens_key] = ids if ids is not None else _UNTOKENIZED

    def produce(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> None:
        ids = self._token_ids(request)
        if ids is None:
            self._approximately(request, candidates)
            return
        _, lora = self._base_of(request.target_model)
        extras = kv_block_index.BlockExtras(lora, request.cache_salt or None)
        by_size: dict[int, list[int]] = {}

        def keys_for(block_size: int) -> list[int]:
            keys = by_size.get(block_size)
            if keys is None:
                keys = by_size[block_size] = kv_block_index.chain_keys(
                    ids, block_size, extras, max_blocks=self.max_blocks
                )
            return keys

        endpoints = [c.endpoint.key for c in candidates]
        index = self.index
        matched = index.match(keys_for, endpoints)
        in_flight = self.in_flight
        if in_flight is not None and len(in_flight):
            for endpoint in endpoints:
                held = in_flight.matched(endpoint, keys_for)
                if held > matched.get(endpoint, 0):
                    matched[endpoint] = held
        block_size = next(iter(by_size), 0) or _block_size_of(index, candidates)
        request.plugin_data[self._block_size_key] = block_size
        request.plugin_data[self.name] = PrefixMatch(
            keys_for(block_size), matched, block_size * CHARS_PER_TOKEN
        )

    def pre_request(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        # Precise matches learn from the servers' events, and count the prompt as held by
        # its target until the response ends; only the fallback records approximately.
        data = request.plugin_data
        if data.get(self._fallback_key):
            self._approximate.pre_request(request, result)
            return
        primary = result.primary
        match = data.get(self.name)
        if self.in_flight is None or primary is None or not primary.targets:
            return
        if not isinstance(match, PrefixMatch) or not match.hashes:
            return
        block_size = data.get(self._block_size_key)
        if not isinstance(block_size, int) or block_size <= 0:
            return
        target = primary.targets[0].endpoint.key
        data[self._in_flight_key] = self.in_flight.add(target, block_size, match.hashes)

    def response_complete(
        self, request: SchedulingRequest, target: Candidate, response: object
    ) -> None:
        """The request-control hook (`ResponseSummary`, a layer above; not read): the
        prompt is no longer in flight."""
        prompt = request.plugin_data.pop(self._in_flight_key, None)
        if self.in_flight is not None and isinstance(prompt, InFlightPrompt):
            self.in_flight.remove(prompt)

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        keep = set(keys)
        self._approximate.retain(keep)
        if self.in_flight is not None:
            self.in_flight.retain(keep)

    def _token_ids(self, request: SchedulingRequest) -> Sequence[int] | None:
        found = request.plugin_data.pop(self._tokens_key, None)
        if found is _UNTOKENIZED:
            return None
        if found is not None:
            return found  # type: ignore[return-value]
        base, _ = self._base_of(request.target_model)
        tokenizer = self.tokenizers.tokenizer(base) if request.body is not None else None
        if tokenizer is None or request.body is None:
            return None
        # Scheduled without `prepare` (a caller that does not await it): tokenize here.
        return self.tokenizers.token_ids_now(tokenizer, request.body)

    def _approximately(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> None:
        model = request.target_model
        self._fallbacks.inc()
        if model not in self._untokenized_models and len(self._untokenized_models) < 64:
            self._untokenized_models.add(model)
            base, _ = self._base_of(model)
            failure = self.tokenizers.failure(base)
            if not self.tokenizers.configured(base):
                why = "has no tokenizer configured (parameter tokenizers)"
            elif failure is not None:
                why = f"has a tokenizer that cannot be loaded ({failure})"
            else:
                why = "came with no single prompt to tokenize"
            logger.warning(
                "%s: model %r %s; matching its requests with the approximate prefix index",
                self.name,
                model,
                why,
            )
        request.plugin_data[self._fallback_key] = True
        self._approximate.produce(request, candidates)


def _block_size_of(index: kv_block_index.KvBlockIndex, candidates: Sequence[Candidate]) -> int:
    """A block size for a request no server matched: a candidate's, else 16."""
    for candidate in candidates:
        pod = index.pod(candidate.endpoint.key)
        if pod is not None and pod.block_size:
            return pod.block_size
        if candidate.metrics.cache_block_size:
            return candidate.metrics.cache_block_size
    return 16


def _string_map(reader: parameters.ParameterReader, key: str) -> dict[str, str]:
    raw = reader.mapping(key) or {}
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(value, str) or not value:
            raise parameters.ParameterError(
                f"{key}.{name}", f"must be a non-empty string, got {value!r}"
            )
        out[str(name)] = value
    return out


class PrecisePrefixCacheScorer:
    """Matched blocks / total blocks from a precise producer's match; `minBlocksForFullScore`
    as in `prefix-cache-scorer`."""

    type_name: Final = "precise-prefix-cache-scorer"

    def __init__(
        self,
        name: str = type_name,
        producer_name: str = PrecisePrefixCacheProducer.type_name,
        *,
        min_blocks_for_full_score: int = 0,
    ) -> None:
        self.name = name
        self.required_producer = producer_name  # the loader wires it into the profile
        self.min_blocks_for_full_score = min_blocks_for_full_score
        self._scorer = prefix_scorer.PrefixCacheScorer(
            name, producer_name, min_blocks_for_full_score=min_blocks_for_full_score
        )

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> PrecisePrefixCacheScorer:
        reader = parameters.ParameterReader(params)
        producer = reader.string(
            "prefixMatchInfoProducerName", PrecisePrefixCacheProducer.type_name
        )
        min_full = reader.integer("minBlocksForFullScore", 0, minimum=0)
        reader.finish()
        return cls(name, producer, min_blocks_for_full_score=min_full)

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return self._scorer.score(request, candidates)
