"""The bytes of request bodies the picker holds, across every stream, capped.

A body is held from its first chunk until it is routed (then handed on to Envoy and let
go). Without a cap, clients that each send most of a large body and stop would grow the
process without bound; with it, a chunk that does not fit ends its request with a clear
503 and the process stays within `max_bytes` (plus one chunk per stream in transit).
"""

from __future__ import annotations


class BodyBudget:
    __slots__ = ("held", "max_bytes", "refused")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.refused = 0  # chunks turned away; for tests and logs

    def take(self, size: int) -> bool:
        if self.held + size > self.max_bytes:
            self.refused += 1
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size
