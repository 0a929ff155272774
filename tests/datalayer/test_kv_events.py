"""The KV-event wire format: both event encodings, hashes >= 2**63, malformed messages."""

from __future__ import annotations

import msgpack
import pytest

from epp.datalayer import kv_events

BIG = 2**64 - 5  # hashes at or above 2**63 occur; they must survive as unsigned


def frames(events: list[object], sequence: int = 7, topic: bytes = b"kv@10.0.0.1:8000@m") -> list:
    return [topic, sequence.to_bytes(8, "big"), msgpack.packb([1.5, events, 0])]


def test_map_encoded_events_decode() -> None:
    batch = kv_events.decode(
        frames(
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [BIG, 12],
                    "parent_block_hash": None,
                    "token_ids": list(range(8)),
                    "block_size": 4,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "extra_keys": [["salt"], None],
                    "group_idx": 0,
                },
                {"type": "BlockRemoved", "block_hashes": [12], "medium": "GPU"},
                {"type": "AllBlocksCleared"},
            ]
        )
    )
    assert (batch.topic, batch.sequence, batch.timestamp, batch.data_parallel_rank) == (
        "kv@10.0.0.1:8000@m",
        7,
        1.5,
        0,
    )
    stored, removed, cleared = batch.events
    assert stored == kv_events.BlockStored(
        (BIG, 12), None, tuple(range(8)), 4, None, None, "GPU", (("salt",), None), 0
    )
    assert removed == kv_events.BlockRemoved((12,), "GPU")
    assert cleared == kv_events.AllBlocksCleared()


def test_tag_first_arrays_decode_to_the_same_values() -> None:
    as_arrays = kv_events.decode(
        frames(
            [
                ["BlockStored", [BIG, 12], 99, list(range(8)), 4, 3, "GPU"],
                ["BlockRemoved", [12], "GPU"],
                ["AllBlocksCleared"],
            ]
        )
    )
    stored, removed, cleared = as_arrays.events
    assert stored == kv_events.BlockStored((BIG, 12), 99, tuple(range(8)), 4, 3, None, "GPU")
    assert removed == kv_events.BlockRemoved((12,), "GPU")
    assert cleared == kv_events.AllBlocksCleared()


@pytest.mark.parametrize("tagged", [False, True])
def test_encode_then_decode_round_trips(tagged: bool) -> None:
    batch = kv_events.EventBatch(
        "kv@a",
        3,
        2.0,
        (
            kv_events.BlockStored(
                (1, BIG),
                None,
                (5, 6, 7, 8),
                2,
                1,
                "lora-a",
                "GPU",
                (("lora-a", "salt"), ("lora-a",)),
            ),
            kv_events.BlockRemoved((BIG,), "GPU"),
            kv_events.AllBlocksCleared(),
        ),
        0,
    )
    assert kv_events.decode(kv_events.encode(batch, tagged_arrays=tagged)) == batch


def test_signed_hashes_fold_to_unsigned() -> None:
    # A publisher that writes int64 sends a hash >= 2**63 as a negative number.
    batch = kv_events.decode(frames([{"type": "BlockRemoved", "block_hashes": [-1]}]))
    assert batch.events[0] == kv_events.BlockRemoved((2**64 - 1,))


def test_unknown_event_types_are_kept_as_unknown() -> None:
    batch = kv_events.decode(
        frames([{"type": "BlockPinned", "block_hashes": [1]}, ["SomethingNew", 1, 2]])
    )
    unknown = kv_events.UnknownEvent
    assert batch.events == (unknown("BlockPinned"), unknown("SomethingNew"))


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ([b"topic", b"\x00" * 8], "expected 3 frames"),
        ([b"t", b"\x00" * 4, msgpack.packb([0, [], 0])], "sequence frame must be 8 bytes"),
        ([b"t", b"\x00" * 8, b"\xc1"], "payload is not msgpack"),
        ([b"t", b"\x00" * 8, msgpack.packb({"a": 1})], "payload must be"),
        (frames([{"block_hashes": [1]}]), "without a string 'type'"),
        (frames([42]), "neither a map nor a tag-first array"),
        (
            frames(
                [{"type": "BlockStored", "block_hashes": [1], "token_ids": ["a"], "block_size": 1}]
            ),
            "BlockStored: token_ids must be a list of integers",
        ),
        (
            frames(
                [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 0}]
            ),
            "block_size must be a positive integer",
        ),
        (
            frames([{"type": "BlockRemoved", "block_hashes": [1.5]}]),
            "a block hash must be an integer or bytes",
        ),
    ],
)
def test_malformed_messages_say_what_is_wrong(message: list, error: str) -> None:
    with pytest.raises(kv_events.MalformedMessage, match=error) as caught:
        kv_events.decode(message)
    assert "\n" not in str(caught.value)
