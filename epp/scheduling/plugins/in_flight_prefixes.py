"""Prompts routed to a server and not yet answered: cached there, though not announced yet.

A server announces a prompt's blocks (`BlockStored`) when it has computed them, which is
after the request waited for a slot and was prefilled: under load, seconds after the
picker routed it. In between, an index fed only by events says nobody holds the prompt,
so every request of a new (or evicted) prefix that arrives in that window is a miss on
every server, and the picker scatters them, each paying a full prefill and taking cache
room for its own copy. The window is widest exactly when a miss costs most: under load.

So the precise producer also counts, per server, the block keys of the requests it routed
there that have not ended. That is not a guess: from routing until the response ends a
request's prompt is queued for, being computed on or held by that server (a running
sequence's blocks cannot be evicted), and when the response ends the server's events
have long said what it keeps. llm-d's precise scorer closes the same window with
"speculative" entries that expire after a TTL (2 s by default); ending them with the
request instead needs no TTL that queueing can outlast.

Bounded by the requests in flight (at most `maxPrefixBlocksToMatch` keys each). Each
picker replica counts only what it routed; the others learn it from the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from epp.datastore.snapshot import EndpointKey


@dataclass(frozen=True, slots=True)
class InFlightPrompt:
    """What one routed request added: its server, block size and block keys."""

    endpoint: EndpointKey
    block_size: int
    keys: tuple[int, ...]


class BlockCounts:
    """How many requests in flight hold each block key (a multiset; absent means none)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def __contains__(self, key: int) -> bool:
        return key in self._counts

    def get(self, key: int) -> int:
        return self._counts.get(key, 0)

    def add(self, keys: Iterable[int]) -> None:
        counts = self._counts
        for key in keys:
            counts[key] = counts.get(key, 0) + 1

    def remove(self, keys: Iterable[int]) -> None:
        """Take back what `add(keys)` counted; a key no longer counted is left alone."""
        counts = self._counts
        for key in keys:
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)


class _ServerPrompts:
    __slots__ = ("block_size", "counts")

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.counts = BlockCounts()


class InFlightPrefixes:
    """Block keys of in-flight requests, per server. Single-threaded (the picker's loop)."""

    def __init__(self) -> None:
        self._servers: dict[EndpointKey, _ServerPrompts] = {}

    def __len__(self) -> int:
        """Servers with requests in flight."""
        return len(self._servers)

    def add(self, endpoint: EndpointKey, block_size: int, keys: Sequence[int]) -> InFlightPrompt:
        server = self._servers.get(endpoint)
        if server is None or server.block_size != block_size:
            # A server has one block size; a request keyed before its first event may have
            # used a guessed one. The newer size wins; the older keys would never match.
            server = self._servers[endpoint] = _ServerPrompts(block_size)
        server.counts.add(keys)
        return InFlightPrompt(endpoint, block_size, tuple(keys))

    def remove(self, prompt: InFlightPrompt) -> None:
        """The request ended; safe if its server's entries were dropped meanwhile."""
        server = self._servers.get(prompt.endpoint)
        if server is None or server.block_size != prompt.block_size:
            return
        server.counts.remove(prompt.keys)
        if not server.counts:
            del self._servers[prompt.endpoint]

    def matched(self, endpoint: EndpointKey, keys_for: Callable[[int], Sequence[int]]) -> int:
        """Leading keys of the request that requests in flight to `endpoint` hold. Each
        request's keys are a whole chain from the first block, so together with the
        server's announced blocks the longest held prefix is the larger of the two."""
        server = self._servers.get(endpoint)
        if server is None:
            return 0
        counts = server.counts
        count = 0
        for key in keys_for(server.block_size):
            if key not in counts:
                break
            count += 1
        return count

    def retain(self, endpoints: set[EndpointKey]) -> None:
        """Drop servers that left the pool; their requests' `remove` is then a no-op."""
        for endpoint in [e for e in self._servers if e not in endpoints]:
            del self._servers[endpoint]
