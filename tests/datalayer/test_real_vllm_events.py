"""The decoder and the block index on KV-event batches captured from a real vLLM
(`tests/fixtures/vllm_kv_events`, see its README), and the picker's tokenizer against the
token ids that vLLM's own `/tokenize` reported for the same requests.

The index is replayed step by step: after each request, the picker's keys over the
request's token ids (with its adapter and salt) must find every whole block vLLM announced.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from epp.bodies import tokenizer as tokenizing
from epp.bodies.parsers import OpenAIParser
from epp.datalayer import kv_block_index, kv_event_source, kv_events
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datalayer.kv_event_extractor import KvEventsExtractor
from epp.datastore.snapshot import Endpoint, EndpointKey

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "vllm_kv_events"
MODEL = ROOT / ".cache" / "tiny-llama"  # built by scripts/vllm-setup

pytestmark = pytest.mark.skipif(
    not (FIXTURES / "prompts.json").is_file(),
    reason=f"no captured vLLM KV events in {FIXTURES}",
)

ENDPOINT = Endpoint(EndpointKey("ns/vllm-rank-0"), "vllm", "ns", "127.0.0.2", 8000)


def messages(path: Path) -> list[list[bytes]]:
    """The capture format: per message a 4-byte frame count, then length-prefixed frames."""
    data, offset, out = path.read_bytes(), 0, []
    while offset < len(data):
        count = int.from_bytes(data[offset : offset + 4], "big")
        offset += 4
        frames = []
        for _ in range(count):
            size = int.from_bytes(data[offset : offset + 4], "big")
            frames.append(data[offset + 4 : offset + 4 + size])
            offset += 4 + size
        out.append(frames)
    return out


def capture() -> dict[str, object]:
    return json.loads((FIXTURES / "prompts.json").read_text())  # type: ignore[no-any-return]


def test_every_captured_message_decodes() -> None:
    info = capture()
    for step in info["steps"]:  # type: ignore[attr-defined]
        batches = [kv_events.decode(m) for m in messages(FIXTURES / f"{step['step']}.bin")]
        assert [b.sequence for b in batches] == step["sequences"]
        assert all(b.topic == info["topic"] for b in batches)
        for batch in batches:
            assert not any(isinstance(e, kv_events.UnknownEvent) for e in batch.events)
            for event in batch.events:
                if isinstance(event, kv_events.BlockStored):
                    assert len(event.token_ids) == event.block_size * len(event.block_hashes)
                    assert all(0 <= h < 2**64 for h in event.block_hashes)  # type: ignore[operator]


def test_the_index_replays_the_capture_and_finds_every_announced_block() -> None:
    info = capture()
    block_size = int(info["block_size"])  # type: ignore[call-overload]
    extractor = KvEventsExtractor()
    current = EndpointMetrics(cache_num_blocks=int(info["num_gpu_blocks"]))  # type: ignore[call-overload]
    for step in info["steps"]:  # type: ignore[attr-defined]
        batches = tuple(kv_events.decode(m) for m in messages(FIXTURES / f"{step['step']}.bin"))
        extractor.extract(kv_event_source.KvEventMessages(batches), ENDPOINT, current)
        pod = extractor.index.pod(ENDPOINT.key)
        assert pod is not None and len(pod) <= current.cache_num_blocks
        last = step["requests"][-1] if step["requests"] else None
        if last is None or not last["path"].endswith("completions"):
            continue
        body = last["body"]
        model = body.get("model", "tiny")
        extras = kv_block_index.BlockExtras(
            model if model != "tiny" else None, body.get("cache_salt")
        )
        keys = kv_block_index.chain_keys(last["prompt_token_ids"], block_size, extras)
        assert pod.matched(keys) == len(keys), step["step"]
        if extras != kv_block_index.NO_EXTRAS:  # the adapter's or salt's blocks only
            plain = kv_block_index.chain_keys(last["prompt_token_ids"], block_size)
            assert pod.matched(keys) != pod.matched(plain) or pod.matched(plain) == len(plain)


@pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file(), reason=f"no model in {MODEL}")
def test_the_pickers_tokenizer_gives_vllms_token_ids() -> None:
    pool = tokenizing.TokenizerPool({"tiny": MODEL})
    tokenizer = pool.tokenizer("tiny")
    assert tokenizer is not None
    checked = 0
    for step in capture()["steps"]:  # type: ignore[attr-defined]
        for sent in step["requests"]:
            if not sent["path"].endswith("completions"):
                continue
            body = {"model": "tiny", **sent["body"]}
            parsed = OpenAIParser().parse(sent["path"], orjson.dumps(body))
            ids = pool.token_ids_now(tokenizer, parsed)
            assert ids is not None and list(ids) == sent["prompt_token_ids"], step["step"]
            checked += 1
    assert checked >= 8
