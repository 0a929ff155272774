"""The simulated GPU's KV cache: a fixed pool of blocks with vLLM-style prefix caching.

Every running sequence holds a `BlockLease`: the blocks its tokens occupy. A block that
holds a full block of prompt tokens is *published* under its chained hash once the prompt
has been prefilled; later prompts that start with the same blocks reuse it instead of
recomputing it. Blocks are reference-counted: while any sequence holds a block it is
pinned; when the last holder lets go, a published block stays cached (still matchable) on
an LRU list and is only evicted when a new allocation needs room. Unpublished blocks
return to the free pool at once.

`usage` is what vLLM reports as `vllm:kv_cache_usage_perc`: blocks held by sequences over
capacity. Cached-but-unheld blocks count as free, because they can be evicted at any time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence


class BlockLease:
    """Blocks held by one sequence: published ones (by hash) and anonymous ones."""

    __slots__ = ("anonymous", "hashed", "released")

    def __init__(self) -> None:
        self.hashed: list[int] = []
        self.anonymous = 0
        self.released = False

    @property
    def num_blocks(self) -> int:
        return len(self.hashed) + self.anonymous


class KVBlockPool:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError("KV cache needs at least one block")
        self.capacity = capacity_blocks
        self._refs: dict[int, int] = {}  # published block hash -> holders
        self._evictable: OrderedDict[int, None] = OrderedDict()  # holders == 0, oldest first
        self._anonymous = 0
        # Told the hashes of cached blocks evicted to make room (the KV-event publisher).
        self.on_evict: Callable[[list[int]], None] | None = None

    @property
    def blocks_in_use(self) -> int:
        return self._anonymous + len(self._refs) - len(self._evictable)

    @property
    def usage(self) -> float:
        return self.blocks_in_use / self.capacity

    @property
    def cached_blocks(self) -> int:
        return len(self._refs)

    def _never_used(self) -> int:
        return self.capacity - self._anonymous - len(self._refs)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are cached (held or evictable)."""
        refs = self._refs
        for i, h in enumerate(hashes):
            if h not in refs:
                return i
        return len(hashes)

    def allocate(self, cached: Sequence[int], fresh: int) -> BlockLease | None:
        """Hold the cached blocks `cached` (from `match`) plus `fresh` new blocks, or
        return None, changing nothing, when the pool cannot make room."""
        reviving = sum(1 for h in cached if self._refs[h] == 0)
        if fresh > self._never_used() + len(self._evictable) - reviving:
            return None
        lease = BlockLease()
        for h in cached:
            if self._refs[h] == 0:
                del self._evictable[h]
            self._refs[h] += 1
            lease.hashed.append(h)
        self._take(fresh)
        lease.anonymous = fresh
        return lease

    def grow(self, lease: BlockLease, blocks: int) -> bool:
        """Add `blocks` anonymous blocks to a lease; False (nothing changes) if full."""
        if lease.released:
            raise ValueError("cannot grow a released lease")
        if blocks > self._never_used() + len(self._evictable):
            return False
        self._take(blocks)
        lease.anonymous += blocks
        return True

    def publish(self, lease: BlockLease, hashes: Sequence[int]) -> list[int]:
        """Make anonymous blocks of `lease` matchable under `hashes` (prompt blocks that
        were just computed). A hash that is already cached keeps its existing block; ours
        stays anonymous, as a duplicate physical block would in vLLM. Returns the
        positions in `hashes` that were newly cached."""
        published: list[int] = []
        for i, h in enumerate(hashes):
            if lease.anonymous == 0:
                break
            if h in self._refs:
                continue
            self._refs[h] = 1
            lease.hashed.append(h)
            lease.anonymous -= 1
            self._anonymous -= 1
            published.append(i)
        return published

    def reset(self) -> bool:
        """Drop every cached block, as vLLM's /reset_prefix_cache; False (nothing changes)
        while a running sequence holds blocks."""
        if self._anonymous or len(self._refs) != len(self._evictable):
            return False
        self._refs.clear()
        self._evictable.clear()
        return True

    def release(self, lease: BlockLease) -> None:
        """Give back every block of `lease`; safe to call more than once."""
        if lease.released:
            return
        lease.released = True
        self._anonymous -= lease.anonymous
        # Last blocks first, so a prompt's tail is evicted before its head.
        for h in reversed(lease.hashed):
            holders = self._refs[h] - 1
            self._refs[h] = holders
            if holders == 0:
                self._evictable[h] = None
        lease.hashed.clear()
        lease.anonymous = 0

    def _take(self, blocks: int) -> None:
        shortfall = blocks - self._never_used()
        evicted: list[int] = []
        for _ in range(max(0, shortfall)):
            h, _ = self._evictable.popitem(last=False)
            del self._refs[h]
            evicted.append(h)
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        self._anonymous += blocks
