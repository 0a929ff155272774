"""`sluice simulate`: run one or more simulated vLLM servers until SIGINT/SIGTERM.

Flag names follow vLLM and llm-d-inference-sim where they overlap. Times given as plain
numbers are in the unit the flag's help names; `20ms`, `1.5s` are accepted too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from epp import arguments
from sluice.sim import config as sim_config
from sluice.sim import engine, fleet, kv_publisher

_PROG = "sluice simulate"


def _speeds(text: str) -> tuple[float, ...]:
    try:
        speeds = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected speeds like 1,1,0.5, got {text!r}") from None
    if not speeds or not all(0 < s < 1000 for s in speeds):
        raise argparse.ArgumentTypeError(f"speeds must be positive numbers, got {text!r}")
    return speeds


def replica_configs(
    cfg: sim_config.SimConfig, replicas: int, speeds: tuple[float, ...]
) -> list[sim_config.SimConfig]:
    """One config per replica, its performance scaled by its speed (cycled)."""
    configs = []
    for i in range(replicas):
        speed = speeds[i % len(speeds)]
        replica = cfg if speed == 1.0 else cfg.replace(performance=cfg.performance.scaled(speed))
        if cfg.kv_events is not None:
            replica = replica.replace(kv_events=cfg.kv_events.for_replica(i))
        configs.append(replica)
    return configs


def _lora_names(values: list[str]) -> tuple[str, ...]:
    """Accepts vLLM's forms: `name`, `name=path`, JSON `{"name": ..., "path": ...}`, and
    comma-separated lists of names. Paths are shown in /v1/models only as the name."""
    names: list[str] = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                names.append(str(json.loads(value)["name"]))
            except (ValueError, KeyError, TypeError):
                raise argparse.ArgumentTypeError(f"bad --lora-modules JSON: {value}") from None
            continue
        names += [part.split("=", 1)[0].strip() for part in value.split(",") if part.strip()]
    return tuple(names)


def build_parser() -> argparse.ArgumentParser:
    p = arguments.OneLineParser(prog=_PROG, description="Simulated vLLM model servers.")
    d = sim_config.SimConfig()
    m = engine.PerformanceModel()
    a = p.add_argument
    a("--model", default=d.model, help="model name served (default %(default)s)")
    a("--served-model-name", nargs="+", default=[], help="names the model answers to")
    a("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    a("--port", type=int, default=8000, help="first port; replica i uses port+i")
    a("--replicas", type=int, default=1, help="servers in this process (default 1)")
    a(
        "--replica-speeds",
        type=_speeds,
        default=(1.0,),
        metavar="S,S,...",
        help="speed of each replica, cycled (2 = every modelled time halves): "
        "a heterogeneous pool, e.g. 1,1,0.5,0.5 (default 1)",
    )
    a(
        "--pod-name-prefix",
        default=None,
        help="pods are named <prefix>-<i> (default sim; a single replica uses $POD_NAME if set)",
    )
    a("--max-num-seqs", type=int, default=m.max_num_seqs, help="batch size limit")
    a(
        "--max-num-batched-tokens",
        type=int,
        default=m.max_num_batched_tokens,
        help="uncached prompt tokens admitted per step (0 = no limit)",
    )
    a(
        "--max-model-len",
        type=int,
        default=d.max_model_len,
        help="context length, prompt + output (0 = KV cache capacity)",
    )
    a("--block-size", type=int, default=m.block_size, help="tokens per KV block")
    a("--kv-cache-size", type=int, default=m.kv_cache_blocks, help="KV cache size in blocks")
    a(
        "--enable-prefix-caching",
        type=arguments.boolean,
        nargs="?",
        const=True,
        default=m.enable_prefix_caching,
        metavar="BOOL",
        help="reuse cached prompt blocks",
    )
    a("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    a(
        "--time-to-first-token",
        type=arguments.duration_in("ms"),
        default=m.ttft_ms,
        help="prefill base time in ms",
    )
    a(
        "--prefill-time-per-token",
        type=arguments.duration_in("ms"),
        default=m.prefill_ms_per_token,
        help="prefill time per uncached prompt token in ms",
    )
    a(
        "--inter-token-latency",
        type=arguments.duration_in("ms"),
        default=m.itl_ms,
        help="decode step time in ms for a batch of one",
    )
    a(
        "--decode-batch-factor",
        type=float,
        default=m.decode_batch_factor,
        help="decode step = ITL * (1 + factor * (batch - 1))",
    )
    a(
        "--time-scale",
        type=float,
        default=d.time_scale,
        help="multiplies every modelled time (0.1 = 10x faster than real time)",
    )
    a("--lora-modules", nargs="+", default=[], help="LoRA adapters: name, name=path or JSON")
    a("--max-loras", type=int, default=m.max_loras, help="adapters loaded at once")
    a(
        "--lora-load-time",
        type=arguments.duration_in("ms"),
        default=m.lora_load_ms,
        help="time in ms to load an adapter",
    )
    a(
        "--default-max-tokens",
        type=int,
        default=d.default_max_tokens,
        help="output tokens when a request sets no max_tokens",
    )
    a(
        "--failure-rate",
        "--failure-injection-rate",
        type=float,
        default=d.failure_rate,
        help="fraction of inference requests answered with --failure-status",
    )
    a("--failure-status", type=int, default=d.failure_status, help="HTTP status of failures")
    a(
        "--slow-start",
        type=arguments.duration_in("s"),
        default=d.slow_start_s,
        help="seconds after start during which everything answers 503",
    )
    a(
        "--silent-after",
        type=arguments.duration_in("s"),
        default=d.silent_after_s,
        help="seconds after start when servers stop answering (0 = never; "
        "POST /sim/silence toggles)",
    )
    a("--seed", type=int, default=d.seed, help="seed for failure injection")
    a(
        "--tokenizer",
        default="",
        metavar="DIR",
        help="model directory whose tokenizer (and chat template) counts prompts, as vLLM "
        "would; KV events then carry the ids a picker with the same tokenizer computes "
        "(default: 4 characters a token)",
    )
    a(
        "--kv-events-config",
        default="",
        metavar="JSON",
        help='publish KV-cache events as vLLM does, e.g. \'{"enable_kv_cache_events": true, '
        '"publisher": "zmq", "endpoint": "tcp://*:5557"}\' (binds with * or ::, '
        "else connects; replica i binds port+i; topic default kv@<host>:<port>@<model>)",
    )
    a(
        "--kv-events-encoding",
        choices=kv_publisher.ENCODINGS,
        default="map",
        help="events as maps with a type key (vLLM from mid 2026) or tag-first arrays "
        "(earlier releases); default %(default)s",
    )
    a("--access-log", type=arguments.boolean, nargs="?", const=True, default=False, metavar="BOOL")
    a("-v", "--verbose", action="count", default=0)
    return p


def config_from_args(args: argparse.Namespace) -> sim_config.SimConfig:
    perf = engine.PerformanceModel(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_blocks=args.kv_cache_size,
        enable_prefix_caching=args.enable_prefix_caching,
        ttft_ms=args.time_to_first_token,
        prefill_ms_per_token=args.prefill_time_per_token,
        itl_ms=args.inter_token_latency,
        decode_batch_factor=args.decode_batch_factor,
        max_loras=args.max_loras,
        lora_load_ms=args.lora_load_time,
    )
    return sim_config.SimConfig(
        model=args.model,
        served_model_names=tuple(args.served_model_name),
        lora_modules=_lora_names(args.lora_modules),
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        performance=perf,
        time_scale=args.time_scale,
        failure_rate=args.failure_rate,
        failure_status=args.failure_status,
        slow_start_s=args.slow_start,
        silent_after_s=args.silent_after,
        seed=args.seed,
        tokenizer=args.tokenizer,
        kv_events=_kv_events(args),
    )


def _kv_events(args: argparse.Namespace) -> kv_publisher.KvEventsConfig | None:
    if not args.kv_events_config:
        return None
    try:
        return kv_publisher.KvEventsConfig.parse(args.kv_events_config, args.kv_events_encoding)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pod_names(args: argparse.Namespace) -> list[str]:
    if args.pod_name_prefix is None and args.replicas == 1 and os.environ.get("POD_NAME"):
        return [os.environ["POD_NAME"]]
    prefix = args.pod_name_prefix or "sim"
    return [f"{prefix}-{i}" for i in range(args.replicas)]


async def _serve(args: argparse.Namespace, cfg: sim_config.SimConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with fleet.run_fleet(
            replica_configs(cfg, args.replicas, args.replica_speeds),
            host=args.host,
            base_port=args.port,
            pod_names=_pod_names(args),
            access_log=args.access_log,
        ) as servers:
            for i, s in enumerate(servers):
                speed = args.replica_speeds[i % len(args.replica_speeds)]
                at = f" at speed {speed:g}" if speed != 1.0 else ""
                print(f"{_PROG}: {s.pod_name} serving {cfg.names[0]!r} on {s.url}{at}", flush=True)
            await stop.wait()
            print(f"{_PROG}: shutting down", flush=True)
    except OSError as e:
        print(
            f"{_PROG}: error: cannot listen on {args.host} ports {args.port}.."
            f"{args.port + args.replicas - 1}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    problems = cfg.problems()
    if args.replicas < 1:
        problems.insert(0, "--replicas must be at least 1")
    if not 0 <= args.port <= 65535 or args.port + args.replicas - 1 > 65535:
        problems.insert(0, f"--port {args.port} with {args.replicas} replicas is out of range")
    if problems:
        parser.error("; ".join(problems))
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_serve(args, cfg))
