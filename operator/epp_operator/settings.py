"""`sluice operator` settings: the picker's flags plus what a production operator needs."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass

from epp import arguments
from epp import cli as picker_cli
from epp.picker import PickerOptions

EVENT_LEVELS = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "none": None,
}


@dataclass(frozen=True, slots=True)
class OperatorOptions:
    picker: PickerOptions
    pool_name: str
    pool_namespace: str
    config_configmap: str | None = None
    config_key: str = "config.yaml"
    namespaces: tuple[str, ...] = ()  # empty: the pool's namespace only
    clusterwide: bool = False
    # Every replica embeds a picker that needs every change, so peering (which pauses all
    # replicas but one) is off unless asked for.
    standalone: bool = True
    peering_name: str = "sluice"
    liveness_host: str = "0.0.0.0"
    liveness_port: int = 8080  # 0: no liveness endpoint
    event_level: int | None = logging.INFO  # None: post no Kubernetes Events
    watch_server_timeout_s: float | None = 300.0
    watch_client_timeout_s: float | None = 330.0
    watch_connect_timeout_s: float | None = 10.0
    watch_inactivity_timeout_s: float = 70.0
    reconnect_backoff_s: float = 1.0
    request_timeout_s: float = 30.0
    resync_period_s: float = 300.0  # 0: only after reconnects
    shutdown_grace_s: float = 10.0
    api_server: str | None = None  # set: talk to this URL without credentials (dev, tests)
    coalesce_snapshots: bool = True  # False only to measure what coalescing saves (bench/)

    @property
    def watched_namespaces(self) -> tuple[str, ...]:
        return self.namespaces or (self.pool_namespace,)


def _event_level(text: str) -> int | None:
    try:
        return EVENT_LEVELS[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(EVENT_LEVELS)}, got {text!r}"
        ) from None


def build_argument_parser() -> argparse.ArgumentParser:
    p = picker_cli.build_argument_parser(prog="sluice operator")
    p.description = "In-cluster operator: watches the cluster and feeds the embedded picker."
    p.set_defaults(pool_namespace=os.environ.get("POD_NAMESPACE", "default"))
    g = p.add_argument_group("operator")
    g.add_argument("--config-configmap", default=None, help="ConfigMap holding the config")
    g.add_argument("--config-configmap-key", default="config.yaml", help="key in that ConfigMap")
    g.add_argument(
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="namespace to watch (repeatable; default: the pool's namespace)",
    )
    g.add_argument("--clusterwide", type=arguments.boolean, nargs="?", const=True, default=False)
    g.add_argument(
        "--standalone",
        type=arguments.boolean,
        nargs="?",
        const=True,
        default=True,
        help="no kopf peering (default true: every replica must see every change)",
    )
    g.add_argument("--peering-name", default="sluice")
    g.add_argument("--liveness-port", type=arguments.port, default=8080, help="0 disables it")
    g.add_argument("--liveness-host", default="0.0.0.0")
    g.add_argument(
        "--event-level",
        type=_event_level,
        default=logging.INFO,
        help="lowest severity posted as Kubernetes Events: info, warning, error, none",
    )
    g.add_argument("--watch-server-timeout", type=arguments.duration, default=300.0)
    g.add_argument("--watch-client-timeout", type=arguments.duration, default=330.0)
    g.add_argument("--watch-connect-timeout", type=arguments.duration, default=10.0)
    g.add_argument("--watch-inactivity-timeout", type=arguments.duration, default=70.0)
    g.add_argument("--reconnect-backoff", type=arguments.duration, default=1.0)
    g.add_argument("--request-timeout", type=arguments.duration, default=30.0)
    g.add_argument(
        "--resync-period",
        type=arguments.duration,
        default=300.0,
        help="list everything again this often, for missed deletions (0: after reconnects only)",
    )
    g.add_argument("--shutdown-grace-period", type=arguments.duration, default=10.0)
    g.add_argument("--api-server", default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--snapshot-coalescing", type=arguments.boolean, default=True, help=argparse.SUPPRESS
    )
    return p


def options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> OperatorOptions:
    if args.manifests or args.endpoints:
        parser.error(
            "--manifests and --endpoints are for `sluice picker`; "
            "the operator takes endpoints from the cluster"
        )
    if not args.pool_name:
        parser.error("--pool-name is required (the InferencePool this picker serves)")
    picker = dataclasses.replace(
        picker_cli.options_from_args(args), shutdown_grace_s=args.shutdown_grace_period
    )
    return OperatorOptions(
        picker=picker,
        pool_name=args.pool_name,
        pool_namespace=args.pool_namespace,
        config_configmap=args.config_configmap,
        config_key=args.config_configmap_key,
        namespaces=tuple(args.namespaces),
        clusterwide=args.clusterwide,
        standalone=args.standalone,
        peering_name=args.peering_name,
        liveness_host=args.liveness_host,
        liveness_port=args.liveness_port,
        event_level=args.event_level,
        watch_server_timeout_s=args.watch_server_timeout,
        watch_client_timeout_s=args.watch_client_timeout,
        watch_connect_timeout_s=args.watch_connect_timeout,
        watch_inactivity_timeout_s=args.watch_inactivity_timeout,
        reconnect_backoff_s=args.reconnect_backoff,
        request_timeout_s=args.request_timeout,
        resync_period_s=args.resync_period,
        shutdown_grace_s=args.shutdown_grace_period,
        api_server=args.api_server,
        coalesce_snapshots=args.snapshot_coalescing,
    )
