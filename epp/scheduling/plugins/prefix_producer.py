"""`approx-prefix-cache-producer`: estimates, per candidate, how much of the prompt is cached.

Before filters and scorers run, it hashes the prompt into chained blocks (see
`prefix_index`) and stores a `PrefixMatch` in `request.plugin_data[<its name>]` for
`prefix-cache-scorer` (and any other consumer) to read. When the request is about to be
forwarded, the primary target records the request's blocks, which is how the index learns.

Parameters (upstream names): `blockSizeTokens` (16), `maxPrefixBlocksToMatch` (256),
`lruCapacityPerServer` (31250), `autoTune` (true: an endpoint that reports its KV-cache
size through `vllm:cache_config_info` gets an LRU of that size, converted to our blocks).

Endpoints leave pools. The runner should call `retain(keys)` when the endpoint set
changes; as a fallback the producer also drops, every few minutes, endpoints that were
neither a candidate nor a target since the previous sweep.

The index is the plugin's state: on config reload, an instance with the same name and
settings is kept (`same_settings`), so the learned prefixes survive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from epp import parameters
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import EndpointKey
from epp.scheduling.interfaces import (
    CHARS_PER_TOKEN,
    Candidate,
    SchedulingRequest,
    SchedulingResult,
)
from epp.scheduling.plugins import prefix_index

DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_PREFIX_BLOCKS = 256
DEFAULT_LRU_CAPACITY_PER_SERVER = 31250
PRUNE_INTERVAL_S = 300.0

# Bounds that catch unit mistakes (bytes for tokens) without limiting real deployments.
_MAX_BLOCK_SIZE_TOKENS = 1 << 16
_MAX_PREFIX_BLOCKS = 1 << 20


@dataclass(frozen=True, slots=True)
class PrefixSettings:
    block_chars: int = DEFAULT_BLOCK_SIZE_TOKENS * CHARS_PER_TOKEN
    max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS
    lru_capacity: int = DEFAULT_LRU_CAPACITY_PER_SERVER
    auto_tune: bool = True

    @classmethod
    def read(cls, reader: parameters.ParameterReader, *, legacy: bool = False) -> PrefixSettings:
        """Read the producer's parameters. `legacy` also accepts the block size in characters
        (`blockSize`, `hashBlockSize`) as upstream's combined `prefix-cache-scorer` took it."""
        char_keys = ("blockSize", "hashBlockSize") if legacy else ()
        given = [k for k in ("blockSizeTokens", *char_keys) if reader.has(k)]
        if len(given) > 1:
            raise parameters.ParameterError(
                given[1], f"conflicts with {given[0]!r}; give the block size once"
            )
        tokens = reader.integer(
            "blockSizeTokens", DEFAULT_BLOCK_SIZE_TOKENS, minimum=1, maximum=_MAX_BLOCK_SIZE_TOKENS
        )
        block_chars = tokens * CHARS_PER_TOKEN
        max_chars = _MAX_BLOCK_SIZE_TOKENS * CHARS_PER_TOKEN
        for key in char_keys:
            block_chars = reader.integer(key, block_chars, minimum=1, maximum=max_chars)
        return cls(
            block_chars=block_chars,
            max_blocks=reader.integer(
                "maxPrefixBlocksToMatch",
                DEFAULT_MAX_PREFIX_BLOCKS,
                minimum=1,
                maximum=_MAX_PREFIX_BLOCKS,
            ),
            lru_capacity=reader.integer(
                "lruCapacityPerServer", DEFAULT_LRU_CAPACITY_PER_SERVER, minimum=1
            ),
            auto_tune=reader.boolean("autoTune", True),
        )

    def capacity_for(self, metrics: EndpointMetrics) -> int:
        """LRU size for an endpoint: its reported KV-cache size in our blocks when auto-tuned."""
        if self.auto_tune and metrics.cache_num_blocks > 0:
            if metrics.cache_block_size > 0:
                tokens = metrics.cache_num_blocks * metrics.cache_block_size
                return max(1, tokens * CHARS_PER_TOKEN // self.block_chars)
            return metrics.cache_num_blocks
        return self.lru_capacity


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """What the producer leaves in `request.plugin_data` for one request."""

    hashes: Sequence[int]
    # Leading blocks each endpoint holds; endpoints with no match are absent.
    matched_blocks: Mapping[EndpointKey, int]
    block_chars: int

    @property
    def total_blocks(self) -> int:
        return len(self.hashes)


class ApproxPrefixCacheProducer:
    type_name = "approx-prefix-cache-producer"

    def __init__(
        self,
        name: str = type_name,
        settings: PrefixSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = settings if settings is not None else PrefixSettings()
        self.index = prefix_index.PrefixIndex()
        self._clock = clock
        self._seen: set[EndpointKey] = set()
        self._next_prune_s = clock() + PRUNE_INTERVAL_S

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> ApproxPrefixCacheProducer:
        reader = parameters.ParameterReader(params)
        settings = PrefixSettings.read(reader)
        reader.finish()
        return cls(name, settings)

    def __repr__(self) -> str:
        return f"ApproxPrefixCacheProducer({self.name!r}, {self.settings})"

    def same_settings(self, other: object) -> bool:
        """True when `other` would behave identically, so this instance (and its index) can
        replace it across a config reload."""
        return type(other) is type(self) and other.settings == self.settings

    def hash_request(self, request: SchedulingRequest) -> list[int]:
        s = self.settings
        return prefix_index.hash_blocks(
            request.target_model,
            request.cache_salt,
            request.prompt_text,
            s.block_chars,
            s.max_blocks,
        )

    def produce(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> None:
        hashes = self.hash_request(request)
        keys = [c.endpoint.key for c in candidates]
        self._seen.update(keys)
        matched = self.index.match(hashes, keys)
        request.plugin_data[self.name] = PrefixMatch(hashes, matched, self.settings.block_chars)
        now = self._clock()
        if now >= self._next_prune_s:
            self._prune(now)

    def pre_request(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        primary = result.primary
        if primary is None or not primary.targets:
            return
        target = primary.targets[0]
        data = request.plugin_data.get(self.name)
        hashes = data.hashes if isinstance(data, PrefixMatch) else self.hash_request(request)
        if not hashes:
            return
        key = target.endpoint.key
        self._seen.add(key)
        self.index.record(key, hashes, self.settings.capacity_for(target.metrics))

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        """Forget endpoints that are no longer in the pool."""
        self.index.retain(keys)

    def _prune(self, now: float) -> None:
        self.index.retain(self._seen)
        self._seen = set()
        self._next_prune_s = now + PRUNE_INTERVAL_S
