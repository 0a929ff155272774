"""What each model server holds in its KV cache, learned from its own KV-cache events.

vLLM names a cached block by a hash the picker cannot reproduce (SHA-256 over pickled
Python tuples by default), so the index names blocks itself: a chain over the token ids
the `BlockStored` events carry,

    key_0 = xxh64(tokens_0 + LE64(ROOT) + extras_0)
    key_i = xxh64(tokens_i + LE64(key_{i-1}) + extras_i)

where `tokens_i` is the block's ids as little-endian u32 and `extras_i` carries the LoRA
adapter (every block) and the request's `cache_salt` (the sequence's first block only),
as vLLM hashes them in. A request tokenized by the picker yields the same keys for the
same tokens, adapter and salt, whichever server cached them.

Per server the index keeps the engine's hashes mapped to these keys, oldest first, so a
`BlockRemoved` (which names engine hashes only) can be applied, and a `BlockStored` that
continues a chain finds its parent's key. A stored block whose parent the index does not
know (evicted, or announced before the picker subscribed) cannot be keyed and is skipped:
its prefix is not matchable anyway without the parent.

Bounds: a server holds at most `capacity` blocks (its `num_gpu_blocks` from
`vllm:cache_config_info`, else a configured default); beyond that the oldest mappings go,
which only happens when removals were missed. Only the GPU tier (medium unset or `GPU`)
and the first KV-cache group are indexed: a CPU-offloaded copy or a hybrid model's other
groups are not what prefix routing saves. Single-threaded: it lives on the picker's loop.
"""

from __future__ import annotations

import array
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import xxhash

from epp.datalayer import kv_events
from epp.datastore.snapshot import EndpointKey

ROOT_KEY: Final = 0x5C1CE  # the parent of a sequence's first block
_xxh64 = xxhash.xxh64_intdigest
_le64 = struct.Struct("<Q").pack

# What applying one event did, for the ingestion counters.
STORED: Final = "BlockStored"
REMOVED: Final = "BlockRemoved"
CLEARED: Final = "AllBlocksCleared"
UNKNOWN: Final = "unknown"
IGNORED: Final = "ignored"  # another medium or KV-cache group
ORPHANED: Final = "orphaned"  # parent block not known: cannot be keyed


@dataclass(frozen=True, slots=True)
class BlockExtras:
    """What besides tokens a block's identity depends on."""

    lora: str | None = None
    cache_salt: str | None = None

    def encoded(self, first: bool) -> bytes:
        parts = b""
        if self.lora:
            parts += b"\x00lora\x00" + self.lora.encode()
        if first and self.cache_salt:
            parts += b"\x00salt\x00" + self.cache_salt.encode()
        return parts


NO_EXTRAS: Final = BlockExtras()


def chain_keys(
    token_ids: Sequence[int],
    block_size: int,
    extras: BlockExtras = NO_EXTRAS,
    *,
    parent: int = ROOT_KEY,
    max_blocks: int | None = None,
) -> list[int]:
    """Keys of the whole blocks of `token_ids` (a trailing partial block has none)."""
    count = len(token_ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count <= 0:
        return []
    data = array.array("I", token_ids[: count * block_size]).tobytes()
    step = block_size * 4
    first = extras.encoded(parent == ROOT_KEY)
    rest = extras.encoded(False)
    keys: list[int] = []
    append = keys.append
    tail = first
    for start in range(0, count * step, step):
        parent = _xxh64(data[start : start + step] + _le64(parent) + tail)
        append(parent)
        tail = rest
    return keys


def event_extras(event: kv_events.BlockStored) -> BlockExtras:
    """The adapter and salt a stored chain was hashed with, read from the event: the
    adapter from `lora_name` (or, when only `lora_id` is sent, the first extra key); the
    salt from the first block's extra keys when the event starts a sequence."""
    first = event.extra_keys[0] if event.extra_keys else None
    lora = event.lora_name
    if lora is None and event.lora_id is not None and first and isinstance(first[0], str):
        lora = first[0]
    salt = None
    if event.parent_block_hash is None and first:
        strings = [k for k in first if isinstance(k, str)]
        if lora is not None and strings and strings[0] == lora:
            strings = strings[1:]
        salt = strings[-1] if strings else None
    return BlockExtras(lora, salt)


class PodBlocks:
    """One server's cached blocks: engine hash -> key, oldest first, and key -> count."""

    __slots__ = ("_keys", "_refs", "block_size")

    def __init__(self) -> None:
        self._keys: OrderedDict[kv_events.BlockHash, int] = OrderedDict()
        self._refs: dict[int, int] = {}
        self.block_size = 0  # from the events; 0 until the first BlockStored

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        return key in self._refs

    def key_of(self, engine_hash: kv_events.BlockHash) -> int | None:
        return self._keys.get(engine_hash)

    def store(self, event: kv_events.BlockStored, capacity: int) -> bool:
        """False when the parent is unknown (nothing stored)."""
        parent = event.parent_block_hash
        if parent is None:
            parent_key = ROOT_KEY
        else:
            found = self._keys.get(parent)
            if found is None:
                return False
            parent_key = found
        self.block_size = event.block_size
        keys = chain_keys(event.token_ids, event.block_size, event_extras(event), parent=parent_key)
        mapping, refs = self._keys, self._refs
        for engine_hash, key in zip(event.block_hashes, keys, strict=False):
            old = mapping.get(engine_hash)
            if old is not None:
                if old == key:
                    mapping.move_to_end(engine_hash)
                    continue
                self._release(old)
                del mapping[engine_hash]
            mapping[engine_hash] = key
            refs[key] = refs.get(key, 0) + 1
        while len(mapping) > capacity:
            _, key = mapping.popitem(last=False)
            self._release(key)
        return True

    def remove(self, hashes: Iterable[kv_events.BlockHash]) -> None:
        pop = self._keys.pop
        for engine_hash in hashes:
            key = pop(engine_hash, None)
            if key is not None:
                self._release(key)

    def clear(self) -> None:
        self._keys.clear()
        self._refs.clear()

    def matched(self, keys: Sequence[int]) -> int:
        """Leading `keys` this server holds."""
        refs = self._refs
        count = 0
        for key in keys:
            if key not in refs:
                break
            count += 1
        return count

    def _release(self, key: int) -> None:
        left = self._refs[key] - 1
        if left:
            self._refs[key] = left
        else:
            del self._refs[key]


class KvBlockIndex:
    """Every server's `PodBlocks`, by endpoint."""

    def __init__(self) -> None:
        self._pods: dict[EndpointKey, PodBlocks] = {}

    def __len__(self) -> int:
        return len(self._pods)

    def pod(self, key: EndpointKey) -> PodBlocks | None:
        return self._pods.get(key)

    def blocks(self) -> int:
        """Blocks indexed over every server."""
        return sum(len(p) for p in self._pods.values())

    def apply(self, key: EndpointKey, event: kv_events.KvEvent, capacity: int) -> str:
        """Apply one event of server `key`; returns what it did (module constants)."""
        if isinstance(event, kv_events.UnknownEvent):
            return UNKNOWN
        if not _indexed_medium(event.medium):
            return IGNORED
        pod = self._pods.get(key)
        if isinstance(event, kv_events.BlockStored):
            if event.group_idx != 0:
                return IGNORED
            if pod is None:
                pod = self._pods[key] = PodBlocks()
            return STORED if pod.store(event, capacity) else ORPHANED
        if isinstance(event, kv_events.BlockRemoved):
            if pod is not None:
                pod.remove(event.block_hashes)
            return REMOVED
        if pod is not None:
            pod.clear()
        return CLEARED

    def reset(self, key: EndpointKey) -> None:
        """Forget what server `key` holds (its event stream had a gap or restarted)."""
        pod = self._pods.get(key)
        if pod is not None:
            pod.clear()

    def forget(self, key: EndpointKey) -> None:
        self._pods.pop(key, None)

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        keep = keys if isinstance(keys, set | frozenset | Mapping) else set(keys)
        for key in [k for k in self._pods if k not in keep]:
            del self._pods[key]

    def match(
        self, keys_for: Callable[[int], Sequence[int]], endpoints: Iterable[EndpointKey]
    ) -> dict[EndpointKey, int]:
        """Leading blocks each endpoint holds; `keys_for(block_size)` gives the request's
        keys in that server's block size. Endpoints with no match are left out."""
        matched: dict[EndpointKey, int] = {}
        pods = self._pods
        for endpoint in endpoints:
            pod = pods.get(endpoint)
            if pod is None or not pod.block_size:
                continue
            count = pod.matched(keys_for(pod.block_size))
            if count:
                matched[endpoint] = count
        return matched


def _indexed_medium(medium: str | None) -> bool:
    return medium is None or medium.upper() == "GPU"
