"""What the scheduler knows about an endpoint's load, and the store that holds it.

Scraped metrics lag: a request the picker routes to an endpoint shows in its metrics only
at the next scrape (50 ms by default). So the store also keeps a ledger of what the picker
routed to each endpoint since that endpoint's last scrape (`EndpointLoad.dispatched`); a
new scrape starts the count again. Saturation detection, filters, scorers and the latency
predictor add it to the scraped queue, so a burst does not herd onto the endpoint that
looked emptiest at the last scrape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

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
    # Every adapter any of its LoRA series names, current or old: vLLM lists an adapter
    # only while it has requests, and keeps the old label sets, so this is what it served.
    served_adapters: frozenset[str] = frozenset()
    served_models: frozenset[str] = frozenset()  # the `model_name` labels of its metrics
    cache_block_size: int = 0
    cache_num_blocks: int = 0
    custom: Mapping[str, float] = field(default_factory=_no_custom)
    updated_at: float = 0.0
    # The last scrape was refused or reset: treated as stale until a scrape succeeds.
    unreachable: bool = False
    # Held out of routing until then (it left requests unanswered): treated as stale.
    held_out_until: float = 0.0

    def is_stale(self, now: float, threshold_s: float) -> bool:
        return (
            self.unreachable
            or self.updated_at <= 0.0
            or now - self.updated_at > threshold_s
            or now < self.held_out_until
        )


NEVER_SCRAPED = EndpointMetrics()


class EndpointLoad(NamedTuple):
    """An endpoint's metrics plus what the picker routed there since they were scraped."""

    metrics: EndpointMetrics
    dispatched: int = 0  # requests
    dispatched_tokens: int = 0  # their estimated prompt tokens


class _Ledger:
    __slots__ = ("requests", "scrape", "tokens")

    def __init__(self, scrape: float) -> None:
        self.scrape = scrape  # the `updated_at` these counts started after
        self.requests = 0
        self.tokens = 0


def _nothing() -> None:
    pass


class MetricsStore:
    """Latest metrics per endpoint. Writers replace whole values, so readers never lock."""

    def __init__(self) -> None:
        # Called when an endpoint's served models or adapters changed (the picker sets it).
        self.on_models_changed: Callable[[], None] = _nothing
        self._metrics: dict[EndpointKey, EndpointMetrics] = {}
        self._ledgers: dict[EndpointKey, _Ledger] = {}

    def get(self, key: EndpointKey) -> EndpointMetrics:
        return self._metrics.get(key, NEVER_SCRAPED)

    def load(self, key: EndpointKey) -> EndpointLoad:
        metrics = self._metrics.get(key, NEVER_SCRAPED)
        ledger = self._ledgers.get(key)
        if ledger is None or ledger.scrape != metrics.updated_at:
            return EndpointLoad(metrics)
        return EndpointLoad(metrics, ledger.requests, ledger.tokens)

    def record_dispatch(self, key: EndpointKey, tokens: int = 0) -> None:
        """The picker routed a request to `key` (counted until its next scrape)."""
        scrape = self._metrics.get(key, NEVER_SCRAPED).updated_at
        ledger = self._ledgers.get(key)
        if ledger is None or ledger.scrape != scrape:
            ledger = self._ledgers[key] = _Ledger(scrape)
        ledger.requests += 1
        ledger.tokens += tokens

    def put(self, key: EndpointKey, metrics: EndpointMetrics) -> None:
        previous = self._metrics.get(key, NEVER_SCRAPED)
        if previous.held_out_until > metrics.held_out_until:
            # A hold-out set while this scrape was in flight outlives the scrape.
            metrics = dataclasses.replace(metrics, held_out_until=previous.held_out_until)
        self._metrics[key] = metrics
        if (
            metrics.served_models != previous.served_models
            or metrics.running_adapters != previous.running_adapters
            or metrics.waiting_adapters != previous.waiting_adapters
            or metrics.served_adapters != previous.served_adapters
        ):
            self.on_models_changed()

    def hold_out(self, key: EndpointKey, until: float) -> None:
        """Keep `key` out of routing (as stale) until `until` (time.monotonic())."""
        current = self._metrics.get(key, NEVER_SCRAPED)
        self._metrics[key] = dataclasses.replace(current, held_out_until=until)

    def held_out(self, key: EndpointKey, now: float) -> bool:
        return now < self._metrics.get(key, NEVER_SCRAPED).held_out_until

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        """Forget endpoints that left the pool."""
        keep = set(keys)
        for key in [k for k in self._metrics if k not in keep]:
            del self._metrics[key]
        for key in [k for k in self._ledgers if k not in keep]:
            del self._ledgers[key]

    def items(self) -> list[tuple[EndpointKey, EndpointMetrics]]:
        return list(self._metrics.items())
