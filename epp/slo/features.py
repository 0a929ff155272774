"""Features of a (request, endpoint) pair, built for all candidates at once.

Time to first token (`TTFT_FEATURES`), what a continuous-batching server makes a new
request wait for:
  its own prefill (the prompt's tokens the endpoint has not cached, from the prefix
  producer's match; 4 characters a token, as everywhere in the picker), the prefills
  ahead of it (uncached tokens of the picker's requests there that are still expected to
  be prefilling), the requests queued there (scraped waiting + routed by the picker since
  the scrape), and the picker's requests in flight there (they hold batch slots).
Time per output token (`TPOT_FEATURES`):
  the batch it will decode in (the picker's requests in flight there, or the scraped
  running batch plus what was routed since, whichever is larger) and KV-cache usage.

Shared prefixes: the in-flight set also counts, per prefix block, the picker's requests in
flight whose prompts contain it (`sharing`): how many requests share the prefix a cache
miss would copy to a new endpoint (see `scorers`, `latency-scorer`).

Token counts are in thousands so every column is of order one, which keeps the ridge
penalty fair across columns. Which endpoint it is (its speed) is not a feature: each
endpoint has its own coefficients (see `model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from epp.datastore.snapshot import EndpointKey
from epp.scheduling.interfaces import CHARS_PER_TOKEN, Candidate
from epp.scheduling.plugins.in_flight_prefixes import BlockCounts
from epp.scheduling.plugins.prefix_producer import PrefixMatch
from epp.slo.model import Array

TTFT_FEATURES = ("bias", "uncached_ktokens", "prefill_ahead_ktokens", "queued", "in_flight")
UNCACHED = TTFT_FEATURES.index("uncached_ktokens")
TPOT_FEATURES = ("bias", "batch", "kv_usage")


class InFlight:
    """The picker's requests in flight per endpoint, with the prompt tokens each must
    prefill there and until when that prefill is expected to last.

    Kept by `slo-request-tracker` (added before a request is sent, removed when it ends,
    on every path) and read by the predictor."""

    __slots__ = ("_blocks", "_entries", "_hashes")

    def __init__(self) -> None:
        # endpoint -> request -> (uncached tokens, expected end of its prefill). Requests
        # are told apart by a token of the tracker's (x-request-id comes from clients).
        self._entries: dict[EndpointKey, dict[int, tuple[int, float]]] = {}
        # Prefix block hash -> requests in flight whose prompt has it (chained hashes: a
        # block's hash stands for the whole prefix up to it); request -> its hashes.
        self._blocks = BlockCounts()
        self._hashes: dict[int, Sequence[int]] = {}

    def add(
        self,
        key: EndpointKey,
        request: int,
        uncached: int,
        prefill_until: float,
        hashes: Sequence[int] = (),
    ) -> None:
        self._entries.setdefault(key, {})[request] = (uncached, prefill_until)
        if hashes and request not in self._hashes:
            self._hashes[request] = hashes
            self._blocks.add(hashes)

    def remove(self, key: EndpointKey, request: int) -> None:
        hashes = self._hashes.pop(request, None)
        if hashes:
            self._blocks.remove(hashes)
        entries = self._entries.get(key)
        if entries is None:
            return
        entries.pop(request, None)
        if not entries:
            del self._entries[key]

    def sharing(self, block: int) -> int:
        """Requests in flight whose prompt starts with the prefix ending at `block`."""
        return self._blocks.get(block)

    def requests(self, key: EndpointKey) -> int:
        entries = self._entries.get(key)
        return len(entries) if entries else 0

    def prefill_ahead(self, key: EndpointKey, now: float) -> int:
        """Uncached tokens of requests there whose prefill is expected to be running."""
        entries = self._entries.get(key)
        if not entries:
            return 0
        return sum(tokens for tokens, until in entries.values() if until > now)

    def is_empty(self) -> bool:
        return not self._entries and not self._blocks

    def total(self) -> int:
        return sum(len(e) for e in self._entries.values())


def matched_tokens(match: object, candidates: Sequence[Candidate]) -> list[int]:
    """Tokens of the prompt each candidate holds, from a prefix producer's match."""
    if not isinstance(match, PrefixMatch) or not match.matched_blocks:
        return [0] * len(candidates)
    per_block = match.block_chars // CHARS_PER_TOKEN
    blocks: Mapping[EndpointKey, int] = match.matched_blocks
    return [blocks.get(c.endpoint.key, 0) * per_block for c in candidates]


def deepest_block(match: object) -> int | None:
    """The hash of the longest prefix of the prompt that some candidate holds."""
    if not isinstance(match, PrefixMatch) or not match.matched_blocks:
        return None
    depth = max(match.matched_blocks.values())
    return match.hashes[depth - 1] if 0 < depth <= len(match.hashes) else None


def as_if_cached(rows: Array, input_tokens: int, cached: Sequence[int]) -> Array:
    """TTFT rows as they would be if every candidate held the longest cached prefix any of
    them holds: what a miss would cost the requests after it once the prefix is copied."""
    best = max(cached, default=0)
    out = rows.copy()
    out[:, UNCACHED] = max(input_tokens - best, 0) / 1000.0
    return out


def ttft_features(
    input_tokens: int,
    candidates: Sequence[Candidate],
    cached: Sequence[int],
    load: InFlight,
    now: float,
) -> Array:
    rows = []
    for c, hit in zip(candidates, cached, strict=True):
        key = c.endpoint.key
        rows.append(
            (
                1.0,
                max(input_tokens - hit, 0) / 1000.0,
                load.prefill_ahead(key, now) / 1000.0,
                c.metrics.waiting_queue_size + c.dispatched,
                load.requests(key),
            )
        )
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(TTFT_FEATURES))


def tpot_features(candidates: Sequence[Candidate], load: InFlight) -> Array:
    rows = [
        (
            1.0,
            max(c.metrics.running_requests + c.dispatched, load.requests(c.endpoint.key)),
            c.metrics.kv_cache_usage,
        )
        for c in candidates
    ]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(TPOT_FEATURES))
