"""`sluice picker`: the endpoint picker without Kubernetes, from the command line.

Flags follow the upstream picker's names; `--validate-config FILE` checks a config,
prints the config the picker would run with, and exits. The operator (`sluice operator`)
extends this argument parser with its own flags.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from epp import arguments, logfmt
from epp.config import effective, loader
from epp.datastore import sources
from epp.picker import Picker, PickerOptions

log = logging.getLogger(__name__)


def build_argument_parser(prog: str = "sluice picker") -> argparse.ArgumentParser:
    p = arguments.OneLineParser(
        prog=prog, description="Endpoint picker for LLM inference (no Kubernetes)."
    )
    p.add_argument("--endpoints", default="", help="static endpoints: ip:port,ip:port")
    p.add_argument(
        "--manifests",
        nargs="+",
        type=Path,
        default=[],
        help="YAML files with Pods, InferencePool, ...",
    )
    p.add_argument("--pool-name", default=None)
    p.add_argument("--pool-namespace", default="default")
    p.add_argument("--config-file", type=Path, default=None, help="EndpointPickerConfig YAML")
    p.add_argument("--config-text", default=None, help="EndpointPickerConfig YAML inline")
    p.add_argument(
        "--validate-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="check an EndpointPickerConfig file, print the effective config (what the "
        "loader adds by default marked so) and exit (0 valid, 1 not)",
    )
    p.add_argument("--grpc-port", type=arguments.port, default=9002)
    p.add_argument("--grpc-health-port", type=arguments.port, default=9003)
    p.add_argument("--metrics-port", type=arguments.port, default=9090)
    p.add_argument("--host", default="0.0.0.0", help="address to bind the servers to")
    p.add_argument("--refresh-metrics-interval", type=arguments.duration, default=0.05)
    p.add_argument("--metrics-staleness-threshold", type=arguments.duration, default=2.0)
    p.add_argument("--secure-serving", type=arguments.boolean, nargs="?", const=True, default=True)
    p.add_argument(
        "--cert-path", type=Path, default=None, help="directory with tls.crt and tls.key"
    )
    p.add_argument("--max-request-body-bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument(
        "--response-sample-rate",
        type=arguments.fraction,
        default=0.01,
        help="share of responses whose body is read for latency and token metrics and the "
        "latency predictor when nothing else needs it (0-1; default 0.01)",
    )
    p.add_argument(
        "--request-body-timeout",
        type=arguments.duration,
        default=30.0,
        help="a request body not complete this long after its headers gets 408 (0: no "
        "deadline; default 30s, as the shipped Envoy configs' request timeout)",
    )
    p.add_argument(
        "--max-body-bytes-in-flight",
        type=int,
        default=256 * 1024 * 1024,
        help="request-body bytes the picker holds across all requests; a chunk beyond it "
        "gets 503 (default 256 MiB)",
    )
    p.add_argument(
        "--response-header-timeout",
        type=arguments.duration,
        default=30.0,
        help="a request that ends with no response headers (or Envoy's 504) after this long "
        "holds its endpoint out of routing for 10s (0: off; default 30s)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def options_from_args(args: argparse.Namespace) -> PickerOptions:
    return PickerOptions(
        host=args.host,
        grpc_port=args.grpc_port,
        health_port=args.grpc_health_port,
        metrics_port=args.metrics_port,
        endpoints=args.endpoints,
        manifests=tuple(args.manifests),
        pool_name=args.pool_name,
        pool_namespace=args.pool_namespace,
        config_file=args.config_file,
        config_text=args.config_text,
        refresh_metrics_interval_s=args.refresh_metrics_interval,
        metrics_staleness_threshold_s=args.metrics_staleness_threshold,
        secure_serving=args.secure_serving,
        cert_path=args.cert_path,
        max_request_body_bytes=args.max_request_body_bytes,
        response_sample_rate=args.response_sample_rate,
        request_body_timeout_s=args.request_body_timeout,
        max_body_bytes_in_flight=args.max_body_bytes_in_flight,
        response_header_timeout_s=args.response_header_timeout,
    )


def tune_garbage_collector() -> None:
    """Every request allocates thousands of short-lived objects (protobuf messages, gRPC
    frames) and almost no cycles; the default gen-0 threshold runs a collection every few
    requests. Freeze what start-up built and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def serve(picker: Picker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await picker.start()
    tune_garbage_collector()
    print(
        f"sluice picker: ext_proc on :{picker.grpc_port}, health on :{picker.health_port}, "
        f"metrics on :{picker.metrics_port}",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    await picker.stop()


def validate_config_file(path: Path) -> tuple[bool, str]:
    """`--validate-config`: the same checks start-up and reload make. Valid: the effective
    config and a summary line; invalid: one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return False, f"{path}: cannot read: {getattr(error, 'strerror', None) or error}"
    try:
        described = effective.describe(text)
    except loader.ConfigError as error:
        return False, f"{path}: {error}"
    return True, f"# effective config of {path}\n{described.text}\n# {described.summary()}"


def warn_about_sources(args: argparse.Namespace) -> None:
    """Say at start-up when the pool source flags give nothing to route to, or combine."""
    if not args.endpoints and not args.manifests:
        log.warning(
            "no --endpoints and no --manifests: the pool is empty, there is nothing to route "
            "to (requests fail with 'no ready endpoints in the pool'); pass --endpoints "
            "ip:port,... or --manifests FILE..."
        )
    elif args.endpoints and args.manifests:
        log.warning(
            "--endpoints and --manifests both given: neither wins, the pool is the "
            "--endpoints plus the Pods the manifests' InferencePool selects (objectives, "
            "rewrites and WorkloadClasses come from the manifests)"
        )


def main(argv: list[str]) -> int:
    args = build_argument_parser().parse_args(argv)
    if args.validate_config is not None:
        valid, text = validate_config_file(args.validate_config)
        if valid:
            print(text)
        else:
            print(f"sluice picker: {text}", file=sys.stderr)
        return 0 if valid else 1
    logfmt.configure(args.verbose)
    try:
        picker = Picker(options_from_args(args))
        warn_about_sources(args)  # after the flags and config passed: a bad one is one line
        asyncio.run(serve(picker))
    except (sources.SourceError, loader.ConfigError, ValueError) as error:
        print(f"sluice picker: {error}", file=sys.stderr)
        return 1
    return 0
