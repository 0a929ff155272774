"""`sluice` console script: one subcommand per way of running Sluice."""

from __future__ import annotations

import importlib
import sys

# Subcommand -> module with `main(argv: list[str]) -> int`. Imported lazily so that
# `sluice simulate` does not pay for gRPC and `sluice picker` does not need kopf.
_COMMANDS: dict[str, tuple[str, str]] = {
    "picker": ("epp.cli", "endpoint picker without Kubernetes (static endpoints, manifests)"),
    "simulate": ("sluice.sim.cli", "simulated vLLM model servers"),
    "demo": ("sluice.demo", "simulators + real Envoy + picker on 127.0.0.1, ready for curl"),
    "gateway": ("sluice.gateway.cli", "real Envoy + picker in front of model servers you run"),
    "bench": ("sluice.loadgen.cli", "send a routing workload at a gateway and summarise it"),
    "operator": ("epp_operator.main", "in-cluster operator with the embedded picker"),
}


def _usage() -> str:
    lines = ["usage: sluice <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in _COMMANDS:
        print(f"sluice: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
