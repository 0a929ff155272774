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
        out.append(pb.ProcessingRequest(response_body=pb.HttpBody(body=answer, end_of_stream=True)))
    return out


async def run_shape(
    picker: Picker, shape: list[pb.ProcessingRequest], requests: int, raw_path: bool = True
) -> float:
    """CPU per request for the message sequence, as the server handles it: bytes in, a
    chunk nothing needs answered from its bytes (unless `raw_path` is off), the rest
    decoded, handled and encoded."""
    director, limit = picker.director, 16 * 1024 * 1024
    raws = [m.SerializeToString() for m in shape]
    parse = pb.ProcessingRequest.FromString

    async def one() -> None:
        stream = RequestStream(director, limit)
        for raw in raws:
            if raw_path and stream.pass_through(raw) is not None:
                continue
            for response in await stream.handle(parse(raw)):
                response.SerializeToString()
        stream.close(ended=True)

    for _ in range(50):  # warm-up
        await one()
    start = time.process_time()
    for _ in range(requests):
        await one()
    return (time.process_time() - start) / requests * 1e6


async def main_async(
    args: argparse.Namespace, configs: dict[str, str | None]
) -> dict[str, dict[str, list[float]]]:
    endpoints = ",".join(f"127.0.0.{i + 2}:8000" for i in range(args.endpoints))
    pickers = {}
    for name, text in configs.items():
        options = PickerOptions(
            endpoints=endpoints,
            secure_serving=False,
            config_text=text,
            response_sample_rate=args.sample_rate,
        )
        picker = Picker(options)
        picker.reconciler.mark_synced()
        pickers[name] = picker
    rng = random.Random(1)
    shapes = {
        "1 KB, not streamed": messages(1_000, 0, rng),
        "1 KB, 16 chunks": messages(1_000, 16, rng),
        "1 KB, 64 chunks": messages(1_000, 64, rng),
        "200 KB, not streamed": messages(200_000, 0, rng),
    }
    variants = [(config, True) for config in pickers]
    if args.compare_raw_path:
        variants.append(("default", False))
    results: dict[str, dict[str, list[float]]] = {
        _label(config, raw): {name: [] for name in shapes} for config, raw in variants
    }
    for _ in range(args.rounds):
        for config, raw in variants:
            for name, shape in shapes.items():
                cost = await run_shape(pickers[config], shape, args.requests, raw)
                results[_label(config, raw)][name].append(cost)
    return results


def _label(config: str, raw_path: bool) -> str:
    return config if raw_path else f"{config}, every message decoded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoints", type=int, default=8)
    parser.add_argument("--configs", nargs="*", default=[], help="EndpointPickerConfig files")
    parser.add_argument("--sample-rate", type=float, default=0.01, help="response sample rate")
    parser.add_argument(
        "--compare-raw-path",
        action="store_true",
        help="also run with every message decoded (no chunk answered from its bytes)",
    )
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
