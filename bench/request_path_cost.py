"""The picker's own work per request, in process: no gRPC, no Envoy, no other process.

Drives `RequestStream` (the ext_proc state machine) with prebuilt Envoy messages for the
shapes the gateway sends — a non-streamed completion, a 16- and a 64-chunk streamed one,
a 200 KB prompt — against a picker on static endpoints, and reports CPU µs per request.
This isolates what the picker's code costs from the gRPC floor that
`picker_overhead.py` includes, so two versions of the code can be compared on a noisy
machine (run both in the same session, alternating).

    .venv/bin/python -m bench.request_path_cost --requests 3000 --rounds 3
    .venv/bin/python -m bench.request_path_cost --configs docs/configs/predicted-latency.yaml

With `--configs`, each config (and the default) runs in the same process, so the cost of
a profile (e.g. the latency predictor's) is read as a ratio against the default's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import time
from pathlib import Path

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

try:  # the module moved; measure either version of the tree
    from epp.picker import Picker, PickerOptions
except ImportError:  # pragma: no cover
    from epp.runner import Picker, PickerOptions  # type: ignore[no-redef,import-not-found]
from epp.extproc.stream import RequestStream


def _headers(pairs: dict[str, str], end: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        ),
        end_of_stream=end,
    )


def messages(prompt_bytes: int, chunks: int, rng: random.Random) -> list[pb.ProcessingRequest]:
    prompt = "".join(rng.choices(string.ascii_lowercase + " ", k=prompt_bytes))
    body = orjson.dumps({"model": "m", "prompt": prompt, "stream": chunks > 0})
    request = {
        ":method": "POST",
        ":path": "/v1/completions",
        ":authority": "gateway",
        "content-type": "application/json",
        "user-agent": "bench",
    }
    out = [
        pb.ProcessingRequest(request_headers=_headers(request)),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]
    if chunks:
        out.append(
            pb.ProcessingRequest(
                response_headers=_headers({":status": "200", "content-type": "text/event-stream"})
            )
        )
        for i in range(chunks):
            event = {"model": "m", "choices": [{"text": f"tok{i}"}]}
            data = b"data: " + orjson.dumps(event) + b"\n\n"
            out.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=data)))
        usage = {"usage": {"prompt_tokens": 10, "completion_tokens": chunks}}
        tail = b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"
        out.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=tail, end_of_stream=True)))
    else:
        out.append(
            pb.ProcessingRequest(
                response_headers=_headers({":status": "200", "content-type": "application/json"})
            )
        )
        answer = orjson.dumps(
            {"model": "m", "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
        )
        out.append(
            pb.ProcessingRequest(response_body=pb.HttpBody(body=answer, end_of_stream=True))
        )
    return out


async def run_shape(picker: Picker, shape: list[pb.ProcessingRequest], requests: int) -> float:
    director, limit = picker.director, 16 * 1024 * 1024
    for _ in range(50):  # warm-up
        stream = RequestStream(director, limit)
        for message in shape:
            await stream.handle(message)
        stream.close()
    start = time.process_time()
    for _ in range(requests):
        stream = RequestStream(director, limit)
        for message in shape:
            await stream.handle(message)
        stream.close()
    return (time.process_time() - start) / requests * 1e6


async def main_async(
    args: argparse.Namespace, configs: dict[str, str | None]
) -> dict[str, dict[str, list[float]]]:
    endpoints = ",".join(f"127.0.0.{i + 2}:8000" for i in range(args.endpoints))
    pickers = {}
    for name, text in configs.items():
        picker = Picker(PickerOptions(endpoints=endpoints, secure_serving=False, config_text=text))
        picker.reconciler.mark_synced()
        pickers[name] = picker
    rng = random.Random(1)
    shapes = {
        "1 KB, not streamed": messages(1_000, 0, rng),
        "1 KB, 16 chunks": messages(1_000, 16, rng),
        "1 KB, 64 chunks": messages(1_000, 64, rng),
        "200 KB, not streamed": messages(200_000, 0, rng),
    }
    results: dict[str, dict[str, list[float]]] = {
        config: {name: [] for name in shapes} for config in pickers
    }
    for _ in range(args.rounds):
        for config, picker in pickers.items():
            for name, shape in shapes.items():
                results[config][name].append(await run_shape(picker, shape, args.requests))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoints", type=int, default=8)
    parser.add_argument("--configs", nargs="*", default=[], help="EndpointPickerConfig files")
    args = parser.parse_args()
    configs: dict[str, str | None] = {"default": None}
    for path in args.configs:
        configs[Path(path).stem] = Path(path).read_text()
    results = asyncio.run(main_async(args, configs))
    for config, shapes in results.items():
        for name, samples in shapes.items():
            print(json.dumps({"config": config, "shape": name, "cpu_us": sorted(samples)}))
    print("\npicker CPU µs per request (lowest of the rounds)\n")
    names = list(results)
    print("| shape | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for name in results["default"]:
        cells = [f"{min(results[c][name]):.0f}" for c in names]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
