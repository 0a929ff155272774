"""Features of a (request, endpoint) pair, built for all candidates at once.

Time to first token (`TTFT_FEATURES`):
  the prompt's uncached and cached tokens on that endpoint (from the prefix producer's
  match; a 4-characters-a-token estimate, as everywhere in the picker), the requests
  queued there (scraped waiting + routed by the picker since the scrape), the running
  batch, KV-cache usage, and the prompt tokens of the picker's requests in flight there.
Time per output token (`TPOT_FEATURES`):
  the batch the request will decode in (running + routed since the scrape), KV-cache
  usage, and the picker's requests in flight there.

Token counts are in thousands so every column is of order one, which keeps the ridge
penalty fair across columns. Which endpoint it is (its speed) is not a feature: each
endpoint has its own coefficients (see `model`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from epp.datastore.snapshot import EndpointKey
from epp.scheduling.interfaces import CHARS_PER_TOKEN, Candidate
from epp.scheduling.plugins.prefix_producer import PrefixMatch
from epp.slo.model import Array

TTFT_FEATURES = (
    "bias",
    "uncached_ktokens",
    "cached_ktokens",
    "queued",
    "running",
    "kv_usage",
    "in_flight_ktokens",
)
TPOT_FEATURES = ("bias", "batch", "kv_usage", "in_flight")


class InFlight:
    """The picker's requests in flight per endpoint: how many, and their prompt tokens.

    Kept by `slo-request-tracker` (added before a request is sent, removed when it ends,
    on every path) and read by the predictor."""

    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests: dict[EndpointKey, int] = {}
        self.tokens: dict[EndpointKey, int] = {}

    def add(self, key: EndpointKey, tokens: int) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1
        self.tokens[key] = self.tokens.get(key, 0) + tokens

    def remove(self, key: EndpointKey, tokens: int) -> None:
        left = self.requests.get(key, 0) - 1
        if left > 0:
            self.requests[key] = left
            self.tokens[key] = self.tokens.get(key, 0) - tokens
        else:
            self.requests.pop(key, None)
            self.tokens.pop(key, None)

    def is_empty(self) -> bool:
        return not self.requests


def matched_tokens(match: object, candidates: Sequence[Candidate]) -> list[int]:
    """Tokens of the prompt each candidate holds, from a prefix producer's match."""
    if not isinstance(match, PrefixMatch) or not match.matched_blocks:
        return [0] * len(candidates)
    per_block = match.block_chars // CHARS_PER_TOKEN
    blocks: Mapping[EndpointKey, int] = match.matched_blocks
    return [blocks.get(c.endpoint.key, 0) * per_block for c in candidates]


def ttft_features(
    input_tokens: int, candidates: Sequence[Candidate], cached: Sequence[int], load: InFlight
) -> Array:
    tokens = load.tokens
    rows = []
    for c, hit in zip(candidates, cached, strict=True):
        m = c.metrics
        hit = min(hit, input_tokens)
        rows.append(
            (
                1.0,
                (input_tokens - hit) / 1000.0,
                hit / 1000.0,
                m.waiting_queue_size + c.dispatched,
                m.running_requests,
                m.kv_cache_usage,
                tokens.get(c.endpoint.key, 0) / 1000.0,
            )
        )
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(TTFT_FEATURES))


def tpot_features(candidates: Sequence[Candidate], load: InFlight) -> Array:
    requests = load.requests
    rows = [
        (
            1.0,
            c.metrics.running_requests + c.dispatched,
            c.metrics.kv_cache_usage,
            requests.get(c.endpoint.key, 0),
        )
        for c in candidates
    ]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(TPOT_FEATURES))
