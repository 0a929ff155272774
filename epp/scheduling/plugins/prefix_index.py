"""An approximate picture of which prompt prefixes each endpoint holds in its KV cache.

The picker never sees tokens, so it approximates: a token is about 4 characters, and a
prompt is cut into blocks of `blockSizeTokens x 4` characters (a trailing partial block is
ignored, as the model server cannot reuse a partial block either). Each block's hash
chains the previous one, so equal hashes mean equal prefixes:

    h0 = xxh64(utf8(model + cache_salt))
    h_i = xxh64(utf8(block_i) + little_endian_u64(h_{i-1}))

`h0` only seeds the chain (different models or salts never share cache); the block hashes
are `h1..hn`.

Each endpoint has an LRU of block hashes. When a request is routed, its blocks are
recorded last block first, so the prefix head is the most recently used part: like a
vLLM server, which frees a finished sequence's tail blocks before its head, the index
forgets the ends of prompts before their beginnings. A candidate's match is the number of
leading blocks present in its LRU (greedy longest prefix).

Memory: an entry costs about 130 bytes in CPython (ordered-dict slot plus the hash's int),
so a full LRU of the default 31,250 blocks is ~4 MB per endpoint; `retain` drops endpoints
that left the pool.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import xxhash

from epp.datastore.snapshot import EndpointKey

_xxh64 = xxhash.xxh64_intdigest
_le64 = struct.Struct("<Q").pack


def hash_blocks(
    model: str, cache_salt: str, prompt: str, block_chars: int, max_blocks: int
) -> list[int]:
    """The chained hashes of the prompt's whole blocks, at most `max_blocks` of them."""
    count = min(len(prompt) // block_chars, max_blocks)
    if count <= 0:
        return []
    previous = _xxh64((model + cache_salt).encode())
    hashes: list[int] = []
    append = hashes.append
    text = prompt[: count * block_chars]
    data = text.encode()
    # Blocks are characters; for ASCII text (most prompts) they are also bytes, so the
    # text is encoded once and sliced, not encoded block by block.
    source: str | bytes = data if len(data) == len(text) else text
    for start in range(0, count * block_chars, block_chars):
        block = source[start : start + block_chars]
        encoded = block if isinstance(block, bytes) else block.encode()
        previous = _xxh64(encoded + _le64(previous))
        append(previous)
    return hashes


class PrefixIndex:
    """Per-endpoint LRUs of block hashes. Single-threaded: it lives on the picker's loop."""

    def __init__(self) -> None:
        self._lrus: dict[EndpointKey, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        """Number of endpoints with an LRU."""
        return len(self._lrus)

    def endpoints(self) -> list[EndpointKey]:
        return list(self._lrus)

    def blocks(self, key: EndpointKey) -> list[int]:
        """The endpoint's block hashes, least recently used first (for tests and debugging)."""
        lru = self._lrus.get(key)
        return list(lru) if lru is not None else []

    def match(self, hashes: Sequence[int], keys: Iterable[EndpointKey]) -> dict[EndpointKey, int]:
        """Leading blocks of `hashes` held by each endpoint; endpoints with none are left out."""
        matched: dict[EndpointKey, int] = {}
        if not hashes:
            return matched
        first = hashes[0]
        lrus = self._lrus
        for key in keys:
            lru = lrus.get(key)
            if lru is None or first not in lru:
                continue
            count = 0
            for h in hashes:
                if h not in lru:
                    break
                count += 1
            matched[key] = count
        return matched

    def record(self, key: EndpointKey, hashes: Sequence[int], capacity: int) -> None:
        """Mark the blocks as cached on the endpoint, evicting least recently used beyond
        `capacity`."""
        lru = self._lrus.get(key)
        if lru is None:
            lru = self._lrus[key] = OrderedDict()
        move = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                move(h)
            else:
                lru[h] = None
        while len(lru) > capacity:
            lru.popitem(last=False)

    def forget(self, key: EndpointKey) -> None:
        self._lrus.pop(key, None)

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        """Drop every endpoint not in `keys` (the pool's current endpoints)."""
        keep = keys if isinstance(keys, set | frozenset | Mapping) else set(keys)
        for key in [k for k in self._lrus if k not in keep]:
            del self._lrus[key]
