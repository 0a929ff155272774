"""What the scheduler knows about an endpoint's load, and the store that holds it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from epp.datastore.snapshot import EndpointKey

_NO_CUSTOM: Mapping[str, float] = MappingProxyType({})


def _no_custom() -> Mapping[str, float]:
    # A factory, because Python 3.11 dataclasses reject an unhashable mappingproxy as a
    # default; every instance still shares the one read-only empty mapping.
    return _NO_CUSTOM


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """One endpoint's metrics as of `updated_at` (time.monotonic(); 0.0 = never scraped)."""

    waiting_queue_size: int = 0
    running_requests: int = 0
    kv_cache_usage: float = 0.0  # fraction, 0..1
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_adapters: int = 0
    cache_block_size: int = 0
    cache_num_blocks: int = 0
    custom: Mapping[str, float] = field(default_factory=_no_custom)
    updated_at: float = 0.0

    def is_stale(self, now: float, threshold_s: float) -> bool:
        return self.updated_at <= 0.0 or now - self.updated_at > threshold_s


NEVER_SCRAPED = EndpointMetrics()


class MetricsStore:
    """Latest metrics per endpoint. Writers replace whole values, so readers never lock."""

    def __init__(self) -> None:
        self._metrics: dict[EndpointKey, EndpointMetrics] = {}

    def get(self, key: EndpointKey) -> EndpointMetrics:
        return self._metrics.get(key, NEVER_SCRAPED)

    def put(self, key: EndpointKey, metrics: EndpointMetrics) -> None:
        self._metrics[key] = metrics

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        """Forget endpoints that left the pool."""
        keep = set(keys)
        for key in [k for k in self._metrics if k not in keep]:
            del self._metrics[key]

    def items(self) -> list[tuple[EndpointKey, EndpointMetrics]]:
        return list(self._metrics.items())
