"""The block index and the extractor that feeds it: store, remove, clear, parents, bounds,
LoRA and salt, sequence gaps and publisher restarts."""

from __future__ import annotations

from epp import metrics
from epp.datalayer import kv_block_index, kv_event_source, kv_events
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datalayer.kv_block_index import BlockExtras, chain_keys
from epp.datalayer.kv_event_extractor import KvEventsExtractor
from epp.datastore.snapshot import Endpoint, EndpointKey

A = EndpointKey("ns/a-rank-0")
B = EndpointKey("ns/b-rank-0")
BS = 4
TOKENS = tuple(range(100, 116))  # four blocks of four


def stored(
    hashes: list[int], tokens: tuple[int, ...], parent: int | None = None, **fields: object
) -> kv_events.BlockStored:
    return kv_events.BlockStored(tuple(hashes), parent, tokens, BS, **fields)  # type: ignore[arg-type]


def held(
    index: kv_block_index.KvBlockIndex,
    key: EndpointKey,
    tokens: tuple[int, ...],
    extras: BlockExtras = kv_block_index.NO_EXTRAS,
) -> int:
    return index.match(lambda size: chain_keys(tokens, size, extras), [key]).get(key, 0)


def test_stored_blocks_match_the_requests_own_keys() -> None:
    index = kv_block_index.KvBlockIndex()
    assert index.apply(A, stored([2**63 + 1, 2], TOKENS[:8]), 100) == kv_block_index.STORED
    assert held(index, A, TOKENS) == 2  # the first two of four blocks
    assert held(index, B, TOKENS) == 0
    assert held(index, A, (1, *TOKENS[1:])) == 0  # a different first token: nothing


def test_a_continued_chain_finds_its_parent_and_an_orphan_is_skipped() -> None:
    index = kv_block_index.KvBlockIndex()
    index.apply(A, stored([1], TOKENS[:4]), 100)
    assert index.apply(A, stored([2, 3], TOKENS[4:12], parent=1), 100) == kv_block_index.STORED
    assert held(index, A, TOKENS) == 3
    assert index.apply(A, stored([9], TOKENS[12:], parent=77), 100) == kv_block_index.ORPHANED
    assert held(index, A, TOKENS) == 3


def test_removed_and_cleared_blocks_stop_matching() -> None:
    index = kv_block_index.KvBlockIndex()
    index.apply(A, stored([1, 2, 3], TOKENS[:12]), 100)
    assert index.apply(A, kv_events.BlockRemoved((2,)), 100) == kv_block_index.REMOVED
    assert held(index, A, TOKENS) == 1  # the chain breaks at the removed block
    assert index.apply(A, kv_events.AllBlocksCleared(), 100) == kv_block_index.CLEARED
    assert held(index, A, TOKENS) == 0
    assert len(index.pod(A) or ()) == 0


def test_other_media_groups_and_unknown_events_are_not_indexed() -> None:
    index = kv_block_index.KvBlockIndex()
    assert index.apply(A, stored([1], TOKENS[:4], medium="CPU"), 100) == kv_block_index.IGNORED
    assert index.apply(A, stored([1], TOKENS[:4], group_idx=1), 100) == kv_block_index.IGNORED
    assert index.apply(A, kv_events.UnknownEvent("X"), 100) == kv_block_index.UNKNOWN
    assert held(index, A, TOKENS) == 0


def test_a_server_holds_at_most_its_capacity_oldest_first_out() -> None:
    index = kv_block_index.KvBlockIndex()
    for i in range(10):  # ten unrelated one-block sequences
        index.apply(A, stored([i], (i, i, i, i)), 4)
    pod = index.pod(A)
    assert pod is not None and len(pod) == 4
    assert held(index, A, (9, 9, 9, 9)) == 1
    assert held(index, A, (0, 0, 0, 0)) == 0


def test_lora_and_salt_separate_equal_tokens() -> None:
    index = kv_block_index.KvBlockIndex()
    index.apply(A, stored([1, 2], TOKENS[:8], lora_id=3, lora_name="adapter"), 100)
    index.apply(B, stored([1, 2], TOKENS[:8], extra_keys=(("tenant-1",), None)), 100)
    assert held(index, A, TOKENS) == 0
    assert held(index, A, TOKENS, BlockExtras(lora="adapter")) == 2
    assert held(index, B, TOKENS) == 0
    assert held(index, B, TOKENS, BlockExtras(cache_salt="tenant-1")) == 2
    assert held(index, B, TOKENS, BlockExtras(cache_salt="tenant-2")) == 0


def test_lora_name_read_from_extra_keys_when_only_the_id_is_sent() -> None:
    event = stored([1], TOKENS[:4], lora_id=3, extra_keys=(("adapter", "salt"),))
    assert kv_block_index.event_extras(event) == BlockExtras("adapter", "salt")


def test_keys_are_unsigned_64_bit_and_chained() -> None:
    keys = chain_keys(TOKENS, BS)
    assert len(keys) == 4 and all(0 <= k < 2**64 for k in keys)
    assert chain_keys(TOKENS[:8], BS) == keys[:2]
    assert chain_keys(TOKENS, BS, max_blocks=3) == keys[:3]
    assert chain_keys(TOKENS[:3], BS) == []


# ---- the extractor ------------------------------------------------------------------------

ENDPOINT = Endpoint(A, "a", "ns", "10.0.0.1", 8000)


def messages(*batches: tuple[int, list[kv_events.KvEvent]]) -> kv_event_source.KvEventMessages:
    return kv_event_source.KvEventMessages(
        tuple(kv_events.EventBatch("kv@a", seq, 0.0, tuple(ev)) for seq, ev in batches)
    )


def counter(metric: object, label: str) -> float:
    return metric.labels(label)._value.get()  # type: ignore[attr-defined]


def test_extractor_applies_batches_and_sets_no_fields() -> None:
    extractor = KvEventsExtractor()
    current = EndpointMetrics(cache_num_blocks=100)
    before = counter(metrics.kv_events_total, "BlockStored")
    out = extractor.extract(messages((5, [stored([1, 2], TOKENS[:8])])), ENDPOINT, current)
    assert out is current
    assert held(extractor.index, A, TOKENS) == 2
    assert counter(metrics.kv_events_total, "BlockStored") == before + 1


def test_a_sequence_gap_resets_the_servers_index() -> None:
    extractor = KvEventsExtractor()
    before = counter(metrics.kv_event_index_resets_total, "gap")
    extractor.extract(messages((0, [stored([1, 2], TOKENS[:8])])), ENDPOINT, EndpointMetrics())
    extractor.extract(
        messages((1, [stored([3], TOKENS[8:12], parent=2)])), ENDPOINT, EndpointMetrics()
    )
    assert held(extractor.index, A, TOKENS) == 3
    # Message 2 is lost: it may have removed blocks, so nothing is trusted any more.
    extractor.extract(messages((3, [])), ENDPOINT, EndpointMetrics())
    assert held(extractor.index, A, TOKENS) == 0
    assert counter(metrics.kv_event_index_resets_total, "gap") == before + 1


def test_a_publisher_restart_resets_and_applies_the_new_stream() -> None:
    extractor = KvEventsExtractor()
    before = counter(metrics.kv_event_index_resets_total, "restart")
    extractor.extract(messages((40, [stored([1, 2], TOKENS[:8])])), ENDPOINT, EndpointMetrics())
    extractor.extract(messages((0, [stored([7], TOKENS[:4])])), ENDPOINT, EndpointMetrics())
    assert held(extractor.index, A, TOKENS) == 1  # only what the new stream stored
    assert counter(metrics.kv_event_index_resets_total, "restart") == before + 1


def test_the_first_sequence_seen_is_a_start_not_a_gap() -> None:
    extractor = KvEventsExtractor()
    before = counter(metrics.kv_event_index_resets_total, "gap")
    extractor.extract(messages((1234, [stored([1], TOKENS[:4])])), ENDPOINT, EndpointMetrics())
    assert counter(metrics.kv_event_index_resets_total, "gap") == before
    assert held(extractor.index, A, TOKENS) == 1


def test_unknown_events_are_counted_and_skipped() -> None:
    extractor = KvEventsExtractor()
    before = counter(metrics.kv_events_total, "unknown")
    extractor.extract(
        messages((0, [kv_events.UnknownEvent("BlockPinned"), stored([1], TOKENS[:4])])),
        ENDPOINT,
        EndpointMetrics(),
    )
    assert counter(metrics.kv_events_total, "unknown") == before + 1
    assert held(extractor.index, A, TOKENS) == 1


def test_capacity_is_the_servers_block_count_else_the_parameter() -> None:
    extractor = KvEventsExtractor.from_parameters("x", {"maxBlocksPerServer": 2})
    many = [stored([i], (i, i, i, i)) for i in range(6)]
    extractor.extract(messages((0, many)), ENDPOINT, EndpointMetrics())
    assert len(extractor.index.pod(A) or ()) == 2
    extractor.extract(messages((1, many)), ENDPOINT, EndpointMetrics(cache_num_blocks=5))
    assert len(extractor.index.pod(A) or ()) == 5


def test_a_server_that_leaves_is_forgotten() -> None:
    extractor = KvEventsExtractor()
    extractor.extract(messages((0, [stored([1], TOKENS[:4])])), ENDPOINT, EndpointMetrics())
    extractor.retain({B})
    assert extractor.index.pod(A) is None
    # Its sequence went too: a new server under the same key starts fresh, no reset.
    before = counter(metrics.kv_event_index_resets_total, "restart")
    extractor.extract(messages((0, [])), ENDPOINT, EndpointMetrics())
    assert counter(metrics.kv_event_index_resets_total, "restart") == before
