"""`sluice operator`: the in-cluster main process (kopf operator + embedded picker)."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from epp import logfmt
from epp.config import loader
from epp.datastore import sources
from epp_operator import settings
from epp_operator.runtime import OperatorRuntime


def main(argv: list[str]) -> int:
    parser = settings.build_argument_parser()
    args = parser.parse_args(argv)
    logfmt.configure(args.verbose)
    options = settings.options_from_args(parser, args)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    runtime = OperatorRuntime(options)
    try:
        runtime.start()
    except (sources.SourceError, loader.ConfigError, ValueError, OSError, TimeoutError) as error:
        print(f"sluice operator: {error}", file=sys.stderr)
        return 1
    picker = runtime.picker
    print(
        f"sluice operator: pool {options.pool_namespace}/{options.pool_name}; ext_proc on "
        f":{picker.grpc_port}, health on :{picker.health_port}, metrics on :{picker.metrics_port}",
        file=sys.stderr,
        flush=True,
    )
    runtime.kopf_done.add_done_callback(lambda _: stop.set())
    # Wake up now and then: a SIGTERM that the kernel delivers to one of gRPC's or kopf's
    # threads only runs its Python handler once the main thread runs bytecode again, and an
    # untimed wait would not (seen as shutdowns that started seconds late).
    while not stop.wait(0.2):
        pass
    failed = runtime.kopf_done.done() and runtime.kopf_done.exception() is not None
    runtime.stop()
    return 1 if failed else 0
