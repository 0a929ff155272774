"""Approximate tokenisation, without downloading a tokenizer.

A token is four characters of text (the usual rule of thumb for English with BPE
tokenizers, and the same ratio the picker's approximate prefix index assumes), so block
boundaries in the simulator line up with the picker's character blocks. Prompts given as
token ids count one token per id.

Only *full* blocks of `block_size` tokens get a hash, as in vLLM. Hashes are chained:
`h_i = xxh64(block_i ‖ LE64(h_{i-1}))` with `h_{-1} = xxh64(seed)`, where the seed carries
the model or LoRA adapter and the request's `cache_salt`, so equal text under different
adapters or salts never shares cache blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

CHARS_PER_TOKEN = 4

_LE64 = struct.Struct("<Q")

# Synthetic output: one word per token, cycled. The text carries no meaning on purpose.
_WORDS = (
    "Sluice ",
    "simulated ",
    "this ",
    "reply ",
    "one ",
    "token ",
    "at ",
    "a ",
    "time ",
    "with ",
    "continuous ",
    "batching ",
    "and ",
    "a ",
    "prefix ",
    "cache. ",
)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A tokenised prompt: its length and the chained hashes of its full blocks."""

    num_tokens: int
    block_hashes: tuple[int, ...]
    # The ids, when the prompt was tokenized for real or given as ids (KV events carry them).
    token_ids: tuple[int, ...] = ()
    cache_salt: str | None = None


def hash_seed(model: str, cache_salt: str | None = None) -> int:
    key = model if cache_salt is None else f"{model}\x00{cache_salt}"
    return xxhash.xxh64_intdigest(key.encode())


def count_text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def text_prompt(text: str, block_size: int, seed: int, cache_salt: str | None = None) -> Prompt:
    block_chars = block_size * CHARS_PER_TOKEN
    full_blocks = len(text) // block_chars
    blocks = (text[i * block_chars : (i + 1) * block_chars].encode() for i in range(full_blocks))
    return Prompt(count_text_tokens(text), _chain(blocks, seed), cache_salt=cache_salt)


def pseudo_token_ids(text: str) -> tuple[int, ...]:
    """Stand-in ids for a prompt counted in characters: one per 4 characters (what KV
    events carry when the simulator has no tokenizer; no picker tokenizer reproduces
    them, so they only serve to exercise the event path)."""
    return tuple(
        xxhash.xxh32_intdigest(text[i : i + CHARS_PER_TOKEN].encode()) & 0xFFFF
        for i in range(0, len(text), CHARS_PER_TOKEN)
    )


def token_ids_prompt(
    ids: Sequence[int], block_size: int, seed: int, cache_salt: str | None = None
) -> Prompt:
    full_blocks = len(ids) // block_size
    blocks = (
        struct.pack(f"<{block_size}q", *ids[i * block_size : (i + 1) * block_size])
        for i in range(full_blocks)
    )
    return Prompt(len(ids), _chain(blocks, seed), tuple(ids), cache_salt)


def _chain(blocks: Iterable[bytes], seed: int) -> tuple[int, ...]:
    hashes: list[int] = []
    previous = seed
    for block in blocks:
        previous = xxhash.xxh64_intdigest(block + _LE64.pack(previous))
        hashes.append(previous)
    return tuple(hashes)


def chat_template(messages: Iterable[tuple[str, str]]) -> str:
    """Render (role, content) pairs the way a chat template would, ending with the
    assistant's turn, so a conversation that grows keeps its earlier turns as a prefix."""
    parts = [f"<|{role}|>\n{content}<|end|>\n" for role, content in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


def output_text(start: int, count: int) -> str:
    """Text of generated tokens `start .. start+count-1`."""
    return "".join(_WORDS[i % len(_WORDS)] for i in range(start, start + count))
