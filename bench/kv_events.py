"""Precise prefix routing's costs: KV-event ingestion, index memory, tokenization.

1. Ingestion, one core. Batches shaped like vLLM's (the capture in
   tests/fixtures/vllm_kv_events: a request's new blocks in one `BlockStored`, evictions
   as one `BlockRemoved` per block), encoded as maps. Two measurements, CPU time of this
   process only:
     decode+apply  `kv_events.decode` + `KvEventsExtractor.extract` on in-memory frames
     through ZMQ   a publisher in a child process sends as fast as it can to the
                   `kv-events-data-source` (connect mode), drained every 50 ms as the
                   collector does, then applied
   and the CPU that N busy pods cost at `--pod-events-per-s` each.
2. Index memory per 100k blocks (tracemalloc), one server, chains of `--blocks-per-event`.
3. Tokenization of 1k / 8k / 32k-token prompts with the test suite's byte-level BPE
   (vocabulary 2048, trained on the docs; `--tokenizer DIR` for another), completions
   and chat (template + encode), plus keying the ids into blocks; median of `--repeat`.

    .venv/bin/python -m bench.kv_events
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import socket
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import orjson
import zmq

from epp.bodies import tokenizer as tokenizing
from epp.bodies.parsers import OpenAIParser, ParsedBody
from epp.datalayer import kv_block_index, kv_event_source, kv_events
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datalayer.kv_event_extractor import KvEventsExtractor
from epp.datastore.snapshot import Endpoint, EndpointKey
from tests.support import tiny_tokenizer

BLOCK = 16
ENDPOINT = Endpoint(EndpointKey("ns/pod-rank-0"), "pod", "ns", "127.0.0.1", 8000)


def workload(batches: int, blocks_per_request: int, seed: int = 1) -> list[list[bytes]]:
    """Messages of a busy server: each batch stores one request's new blocks (a new chain)
    and evicts as many old blocks, one BlockRemoved each, as vLLM does."""
    rng = random.Random(seed)
    live: list[int] = []
    out: list[list[bytes]] = []
    for sequence in range(batches):
        hashes = tuple(rng.getrandbits(64) for _ in range(blocks_per_request))
        tokens = tuple(rng.randrange(32000) for _ in range(blocks_per_request * BLOCK))
        events: list[kv_events.KvEvent] = [
            kv_events.BlockStored(hashes, None, tokens, BLOCK, medium="GPU")
        ]
        if len(live) > 50_000:
            events += [
                kv_events.BlockRemoved((live.pop(0),), "GPU") for _ in range(blocks_per_request)
            ]
        live.extend(hashes)
        out.append(kv_events.encode(kv_events.EventBatch("kv@p", sequence, 0.0, tuple(events), 0)))
    return out


def count_events(messages: list[list[bytes]]) -> int:
    return sum(len(kv_events.decode(m).events) for m in messages)


def ingest_in_memory(messages: list[list[bytes]]) -> float:
    """CPU seconds to decode and apply every message."""
    extractor = KvEventsExtractor()
    metrics = EndpointMetrics(cache_num_blocks=60_000)
    start = time.process_time()
    for frames in messages:
        batch = kv_events.decode(frames)
        extractor.extract(kv_event_source.KvEventMessages((batch,)), ENDPOINT, metrics)
    return time.process_time() - start


def _publish(port: int, messages: list[list[bytes]], ready: multiprocessing.Event) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.SNDHWM, 0)
    publisher.bind(f"tcp://127.0.0.1:{port}")
    ready.wait()
    for frames in messages:
        publisher.send_multipart(frames)
    time.sleep(1.0)
    context.destroy(linger=0)


async def ingest_through_zmq(messages: list[list[bytes]]) -> tuple[float, int, float]:
    """(CPU seconds of this process, messages received, wall seconds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    source = kv_event_source.new_kv_events_data_source(
        "kv", {"port": port, "maxMessagesPerTick": 1_000_000}
    )
    extractor = KvEventsExtractor()
    source.add_extractor(extractor)
    metrics = EndpointMetrics(cache_num_blocks=60_000)
    await source.fetch(ENDPOINT)  # connects
    ready = multiprocessing.Event()
    child = multiprocessing.Process(target=_publish, args=(port, messages, ready))
    child.start()
    await asyncio.sleep(0.5)  # the subscription must be live before the first message
    ready.set()
    received, idle = 0, 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while received < len(messages) and idle < 40:
        payload = await source.fetch(ENDPOINT)
        extractor.extract(payload, ENDPOINT, metrics)
        received += len(payload.batches)
        idle = 0 if payload.batches else idle + 1
        await asyncio.sleep(0.05)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    child.join()
    source.close()
    return cpu, received, wall


def index_memory(blocks: int, per_event: int) -> float:
    """Bytes per indexed block."""
    rng = random.Random(2)
    events = []
    for _ in range(blocks // per_event):
        hashes = tuple(rng.getrandbits(64) for _ in range(per_event))
        tokens = tuple(rng.randrange(32000) for _ in range(per_event * BLOCK))
        events.append(kv_events.BlockStored(hashes, None, tokens, BLOCK))
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    index = kv_block_index.KvBlockIndex()
    for event in events:
        index.apply(ENDPOINT.key, event, blocks)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    stored = index.blocks()
    assert stored == blocks // per_event * per_event
    return grown / stored


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds of `fn`."""
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def _prompt_of(tok: tokenizing.ModelTokenizer, text: str, size: int) -> str:
    """About `size` tokens of `text` (repeated as needed)."""
    prompt = text
    while len(tok.encode_text(prompt)) < size:
        prompt += text
    lo, hi = 0, len(prompt)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(tok.encode_text(prompt[:mid])) < size else (lo, mid)
    return prompt[:hi]


def _costs(tok: tokenizing.ModelTokenizer, prompt: str, repeat: int) -> dict[str, float]:
    parser = OpenAIParser()
    completion = parser.parse("/v1/completions", orjson.dumps({"model": "m", "prompt": prompt}))
    half = len(prompt) // 2
    chat = parser.parse(
        "/v1/chat/completions",
        orjson.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "system", "content": prompt[:half]},
                    {"role": "user", "content": prompt[half:]},
                ],
            }
        ),
    )
    ids = tok.encode_text(prompt)

    def fresh(body: ParsedBody) -> object:
        return tokenizing.TokenizerPool(loaded={"m": tok}).token_ids_now(tok, body)

    cached = tokenizing.TokenizerPool(loaded={"m": tok})
    cached.token_ids_now(tok, completion)
    return {
        "tokens": len(ids),
        "chars": len(prompt),
        "completion_ms": _timed(lambda: fresh(completion), repeat),
        "chat_ms": _timed(lambda: fresh(chat), repeat),
        "keys_ms": _timed(lambda: kv_block_index.chain_keys(ids, BLOCK), repeat),
        "cached_ms": _timed(lambda: cached.token_ids_now(tok, completion), repeat),
    }


def tokenization(directory: Path, sizes: list[int], repeat: int) -> list[dict[str, float]]:
    tok = tokenizing.load(directory)
    text = "".join(p.read_text() for p in sorted(Path("docs").glob("*.md")))
    return [_costs(tok, _prompt_of(tok, text, size), repeat) for size in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--blocks-per-event", type=int, default=24)
    parser.add_argument("--pods", type=int, default=8)
    parser.add_argument(
        "--pod-events-per-s",
        type=float,
        default=2500.0,
        help="events a busy pod publishes (default: ~2,500, i.e. ~40k "
        "prefill tokens/s in 16-token blocks stored and as many evicted)",
    )
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--tokenizer", type=Path, default=None)
    args = parser.parse_args()

    messages = workload(args.batches, args.blocks_per_event)
    events = count_events(messages)
    blocks = args.batches * args.blocks_per_event
    cpu = min(ingest_in_memory(messages) for _ in range(3))
    print(
        f"workload: {len(messages)} batches, {events} events "
        f"({blocks} blocks stored, one BlockRemoved per evicted block)"
    )
    print(
        f"decode+apply: {events / cpu:,.0f} events/s, {blocks / cpu:,.0f} stored blocks/s "
        f"on one core ({cpu / events * 1e6:.2f} us/event)"
    )
    zcpu, received, wall = asyncio.run(ingest_through_zmq(messages))
    got = sum(len(kv_events.decode(m).events) for m in messages[:received])
    print(
        f"through ZMQ: {received}/{len(messages)} batches in {wall:.1f}s wall, "
        f"{got / zcpu:,.0f} events/s per core of subscriber CPU "
        f"({zcpu / got * 1e6:.2f} us/event)"
    )
    per_event = zcpu / got
    load = args.pods * args.pod_events_per_s
    print(
        f"{args.pods} busy pods at {args.pod_events_per_s:,.0f} events/s each = "
        f"{load:,.0f} events/s: {load * per_event * 100:.1f}% of a core"
    )
    per_block = index_memory(100_000, args.blocks_per_event)
    print(
        f"index memory: {per_block:.0f} bytes/block = {per_block * 100_000 / 2**20:.1f} MiB "
        "per 100k blocks"
    )
    directory = args.tokenizer
    if directory is None:
        directory = tiny_tokenizer.write(Path(tempfile.mkdtemp()) / "tiny")
    print("tokenization (median ms): tokens  chars  completion  chat  block-keys  cached")
    for row in tokenization(directory, [1000, 8000, 32000], args.repeat):
        print(
            f"  {row['tokens']:>6} {row['chars']:>7} {row['completion_ms']:>9.2f} "
            f"{row['chat_ms']:>6.2f} {row['keys_ms']:>9.3f} {row['cached_ms']:>8.3f}"
        )


if __name__ == "__main__":
    main()
