"""vLLM's KV-cache events on the wire: three ZMQ frames, decoded into plain values.

A publisher (one per model server, or per data-parallel rank) sends each batch as

    frame 0  topic (bytes; vLLM's convention is `kv@<ip>:<port>@<model>`)
    frame 1  sequence number: 8 bytes, big-endian, per publisher, counting from 0
    frame 2  msgpack `[timestamp, [event, ...], data_parallel_rank]`

An event is either a map with a `type` key (vLLM from mid 2026 on) or a tag-first array
(earlier releases, msgspec's `array_like` encoding, trailing defaults omitted):

    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
     medium, lora_name, extra_keys]
    ["BlockRemoved", block_hashes, medium]
    ["AllBlocksCleared"]

Both decode to the same values. An event type this module does not know becomes
:class:`UnknownEvent` (counted and skipped by the index, never an error), so a newer vLLM
that adds event kinds keeps working. Block hashes are opaque: unsigned 64-bit integers
(a signed encoding is folded into that range) or, from publishers that send digests,
bytes. Anything else that does not fit raises :class:`MalformedMessage`, one line saying
what was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

BlockHash = int | bytes
"""An engine's block hash, opaque to the picker."""

_U64: Final = (1 << 64) - 1


class MalformedMessage(ValueError):
    """A message that is not a KV-event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks newly cached, in chain order; `token_ids` holds every block's tokens."""

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    lora_name: str | None = None
    medium: str | None = None
    # Per block: the extra keys the engine hashed in (LoRA name, cache_salt on a
    # sequence's first block, multimodal hashes), or None.
    extra_keys: tuple[tuple[object, ...] | None, ...] | None = None
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    type_name: str


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared | UnknownEvent


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published message."""

    topic: str
    sequence: int
    timestamp: float
    events: tuple[KvEvent, ...]
    data_parallel_rank: int | None = None


def decode(frames: Sequence[bytes]) -> EventBatch:
    """The batch in one three-frame message; MalformedMessage when it is not one."""
    if len(frames) != 3:
        raise MalformedMessage(f"expected 3 frames (topic, sequence, payload), got {len(frames)}")
    topic, sequence, payload = frames
    if len(sequence) != 8:
        raise MalformedMessage(f"sequence frame must be 8 bytes, got {len(sequence)}")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedMessage(f"payload is not msgpack: {exc}") from None
    if not isinstance(body, list | tuple) or len(body) < 2:
        raise MalformedMessage("payload must be [timestamp, [events], data_parallel_rank]")
    timestamp, events = body[0], body[1]
    rank = body[2] if len(body) > 2 else None
    if not isinstance(timestamp, int | float) or not isinstance(events, list | tuple):
        raise MalformedMessage("payload must be [timestamp, [events], data_parallel_rank]")
    return EventBatch(
        topic=topic.decode("utf-8", "replace"),
        sequence=int.from_bytes(sequence, "big"),
        timestamp=float(timestamp),
        events=tuple(decode_event(event) for event in events),
        data_parallel_rank=rank if isinstance(rank, int) else None,
    )


def decode_event(raw: object) -> KvEvent:
    """One event, in either encoding."""
    if isinstance(raw, Mapping):
        kind = raw.get("type")
        if not isinstance(kind, str):
            raise MalformedMessage(f"event map without a string 'type': {_short(raw)}")
        fields: Mapping[str, Any] = raw
    elif isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = _ARRAY_FIELDS.get(kind)
        if names is None:
            return UnknownEvent(kind)
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise MalformedMessage(f"event is neither a map nor a tag-first array: {_short(raw)}")
    try:
        if kind == "BlockStored":
            return _block_stored(fields)
        if kind == "BlockRemoved":
            return BlockRemoved(_hashes(fields.get("block_hashes")), _text(fields.get("medium")))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared(_text(fields.get("medium")))
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"{kind}: {exc}") from None
    return UnknownEvent(kind)


_ARRAY_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": ("medium",),
}


def _block_stored(fields: Mapping[str, Any]) -> BlockStored:
    hashes = _hashes(fields.get("block_hashes"))
    parent = fields.get("parent_block_hash")
    tokens = fields.get("token_ids")
    if not isinstance(tokens, list | tuple) or not all(type(t) is int for t in tokens):
        raise ValueError("token_ids must be a list of integers")
    block_size = fields.get("block_size")
    if type(block_size) is not int or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    lora_id = fields.get("lora_id")
    group = fields.get("group_idx", 0)
    extra = fields.get("extra_keys")
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None if parent is None else _hash(parent),
        token_ids=tuple(tokens),
        block_size=block_size,
        lora_id=lora_id if type(lora_id) is int else None,
        lora_name=_text(fields.get("lora_name")),
        medium=_text(fields.get("medium")),
        extra_keys=_extra_keys(extra) if isinstance(extra, list | tuple) else None,
        group_idx=group if type(group) is int else 0,
    )


def _hash(value: object) -> BlockHash:
    if type(value) is int:
        return value & _U64  # an int64 encoding of a hash >= 2**63 comes out negative
    if isinstance(value, bytes):
        return value
    raise ValueError(f"a block hash must be an integer or bytes, got {_short(value)}")


def _hashes(value: object) -> tuple[BlockHash, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"block_hashes must be a list, got {_short(value)}")
    return tuple(_hash(h) for h in value)


def _extra_keys(value: Sequence[object]) -> tuple[tuple[object, ...] | None, ...]:
    return tuple(tuple(keys) if isinstance(keys, list | tuple) else None for keys in value)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def encode(batch: EventBatch, *, tagged_arrays: bool = False) -> list[bytes]:
    """The three frames of `batch` (the simulator's publisher and tests use it).
    `tagged_arrays` writes the pre-2026 tag-first array events instead of maps."""
    events = [_encode_event(e, tagged_arrays) for e in batch.events]
    payload = msgpack.packb([batch.timestamp, events, batch.data_parallel_rank])
    return [batch.topic.encode(), batch.sequence.to_bytes(8, "big"), payload]


def _encode_event(event: KvEvent, tagged_arrays: bool) -> object:
    if isinstance(event, UnknownEvent):
        return [event.type_name] if tagged_arrays else {"type": event.type_name}
    if isinstance(event, BlockStored):
        kind = "BlockStored"
        fields: dict[str, object] = {
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": event.medium,
            "lora_name": event.lora_name,
            "extra_keys": (
                None
                if event.extra_keys is None
                else [None if k is None else list(k) for k in event.extra_keys]
            ),
        }
    elif isinstance(event, BlockRemoved):
        kind = "BlockRemoved"
        fields = {"block_hashes": list(event.block_hashes), "medium": event.medium}
    else:
        kind = "AllBlocksCleared"
        fields = {"medium": event.medium}
    if tagged_arrays:
        return [kind, *(fields[name] for name in _ARRAY_FIELDS[kind])]
    return {"type": kind, **fields}
