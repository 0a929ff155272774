"""`kv-events-extractor`: applies each server's KV-cache events to the block index.

It reads what `kv-events-data-source` drained for an endpoint, checks the publisher's
sequence numbers and applies the events to its :class:`~epp.datalayer.kv_block_index.
KvBlockIndex`, which `precise-prefix-cache-producer` matches requests against. It sets no
metric fields; the endpoint's `cache_num_blocks` (read by `core-metrics-extractor` from
`vllm:cache_config_info`) bounds that server's share of the index, `maxBlocksPerServer`
until it is known.

Sequence numbers count from 0 per publisher. The first batch seen from a server is taken
as it comes (events before the subscription are lost anyway). After that, a number that
skips ahead means messages were lost (a full ZMQ queue, a network blip): a removal may be
among them, so the server's blocks are forgotten rather than trusted. A number that goes
back means the publisher restarted, and with it the server's cache: forgotten as well.
Both are counted in `inference_extension_kv_event_index_resets_total`; the batch that
revealed them is applied to the emptied index.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Final

from epp import metrics, parameters
from epp.datalayer import kv_block_index, kv_event_source
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import Endpoint, EndpointKey

logger = logging.getLogger(__name__)

TYPE_NAME: Final = "kv-events-extractor"
DEFAULT_MAX_BLOCKS_PER_SERVER: Final = 1 << 18

_OUTCOMES = {
    outcome: metrics.kv_events_total.labels(outcome)
    for outcome in (
        kv_block_index.STORED,
        kv_block_index.REMOVED,
        kv_block_index.CLEARED,
        kv_block_index.UNKNOWN,
        kv_block_index.IGNORED,
        kv_block_index.ORPHANED,
    )
}
_GAP = metrics.kv_event_index_resets_total.labels("gap")
_RESTART = metrics.kv_event_index_resets_total.labels("restart")


class KvEventsExtractor:
    type_name: Final = TYPE_NAME
    input_type: Final = kv_event_source.KvEventMessages

    def __init__(
        self, name: str = TYPE_NAME, *, max_blocks_per_server: int = DEFAULT_MAX_BLOCKS_PER_SERVER
    ) -> None:
        self._name = name
        self.max_blocks_per_server = max_blocks_per_server
        self.index = kv_block_index.KvBlockIndex()
        self._sequences: dict[EndpointKey, int] = {}
        self._unknown_logged: set[str] = set()

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> KvEventsExtractor:
        reader = parameters.ParameterReader(params)
        limit = reader.integer("maxBlocksPerServer", DEFAULT_MAX_BLOCKS_PER_SERVER, minimum=1)
        reader.finish()
        return cls(name, max_blocks_per_server=limit)

    @property
    def name(self) -> str:
        return self._name

    def same_settings(self, other: object) -> bool:
        return (
            isinstance(other, KvEventsExtractor)
            and other.max_blocks_per_server == self.max_blocks_per_server
        )

    def extract(
        self,
        payload: kv_event_source.KvEventMessages,
        endpoint: Endpoint,
        current: EndpointMetrics,
    ) -> EndpointMetrics:
        if not payload.batches:
            return current
        key = endpoint.key
        capacity = current.cache_num_blocks or self.max_blocks_per_server
        index, sequences, outcomes = self.index, self._sequences, _OUTCOMES
        for batch in payload.batches:
            last = sequences.get(key)
            if last is not None and batch.sequence != last + 1:
                restarted = batch.sequence <= last
                (_RESTART if restarted else _GAP).inc()
                index.reset(key)
                logger.info(
                    "KV events of %s %s (sequence %d after %d); its block index starts over",
                    key,
                    "restarted" if restarted else f"lost {batch.sequence - last - 1} message(s)",
                    batch.sequence,
                    last,
                )
            sequences[key] = batch.sequence
            for event in batch.events:
                outcome = index.apply(key, event, capacity)
                outcomes[outcome].inc()
                if outcome == kv_block_index.UNKNOWN:
                    self._log_unknown(event)
        return current

    def forget(self, endpoint: Endpoint) -> None:
        """The endpoint left the pool (or moved): drop its blocks and sequence."""
        self.index.forget(endpoint.key)
        self._sequences.pop(endpoint.key, None)

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        keep = frozenset(keys)
        self.index.retain(keep)
        for key in [k for k in self._sequences if k not in keep]:
            del self._sequences[key]

    def _log_unknown(self, event: object) -> None:
        kind = getattr(event, "type_name", "?")
        if kind not in self._unknown_logged and len(self._unknown_logged) < 16:
            self._unknown_logged.add(kind)
            logger.info("KV event type %r is not known to the picker; skipping it", kind)
