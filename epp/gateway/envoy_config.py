"""Envoy bootstrap configurations for running Sluice behind a real Envoy.

`render_bootstrap(options)` turns one frozen `GatewayOptions` value into an Envoy v3
bootstrap (a plain dict, written as JSON by `write_bootstrap`). Three shapes exist:

* ``picker`` — the Gateway API Inference Extension data path: the ext_proc filter streams
  every request to the endpoint picker over gRPC (HTTP/2, optionally TLS); the picker
  answers with the ``x-gateway-destination-endpoint: ip:port`` header and the router sends
  the request to an ``ORIGINAL_DST`` cluster that reads its destination from that header.
* ``original-dst`` — the same routing without ext_proc: the *client* names the backend in
  the header. A baseline that costs the same routing work as ``picker`` minus the picker.
* ``direct`` — a plain ``STATIC`` cluster of the backends with Envoy's own load balancing
  (round robin or least request): the baseline for benchmarks.

Routing in ``picker`` and ``original-dst`` mode uses two routes. The first matches when the
destination header is present and goes to the ``ORIGINAL_DST`` cluster. The second catches
requests without the header: with ``fallback_backends`` it balances them over those
backends (the pool), otherwise it answers 503 with a body naming the cause. This second
route is what makes FailOpen useful: when the picker cannot be reached and
``failure_mode_allow`` lets the request continue, no header was set, and without the
fallback an ``ORIGINAL_DST`` cluster would have no destination at all. With FailClose
Envoy itself answers 500 when the picker is unreachable, before routing.

Because the first route depends on a header the picker sets, the route must be recomputed
after the picker's header response; the filter is configured with
``route_cache_action: CLEAR`` so that happens even if a picker forgets
``clear_route_cache``.

In ``picker`` mode a header-mutation filter in front of ext_proc removes any destination
header sent by the client, so a client cannot choose its own backend (and a FailOpen
request cannot be steered by the client either).
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
LB_METADATA_NAMESPACE = "envoy.lb"

PICKER_CLUSTER = "endpoint_picker"
ORIGINAL_DST_CLUSTER = "pool_original_dst"
POOL_CLUSTER = "pool"

_TYPE = "type.googleapis.com/"
_EXT_PROC_MAX_TIMEOUT_S = 3600.0  # upper bound enforced by Envoy's config validation


class GatewayMode(enum.StrEnum):
    PICKER = "picker"
    ORIGINAL_DST = "original-dst"
    DIRECT = "direct"


class FailureMode(enum.StrEnum):
    """InferencePool `endpointPickerRef.failureMode`."""

    FAIL_OPEN = "FailOpen"
    FAIL_CLOSE = "FailClose"


class BodyMode(enum.StrEnum):
    """ext_proc `ProcessingMode.BodySendMode` values Sluice supports."""

    FULL_DUPLEX_STREAMED = "FULL_DUPLEX_STREAMED"
    BUFFERED = "BUFFERED"
    STREAMED = "STREAMED"
    NONE = "NONE"


class LbPolicy(enum.StrEnum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"


@dataclass(frozen=True)
class GatewayOptions:
    """Everything that varies between the Envoy configurations Sluice runs.

    Ports set to 0 are chosen by the kernel when Envoy binds them; `EnvoyProcess` reads
    the real ports back from Envoy's admin interface, so no port can be stolen in between.
    """

    mode: GatewayMode = GatewayMode.PICKER
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    admin_host: str = "127.0.0.1"
    admin_port: int = 0
    # picker mode: where the ext_proc gRPC server listens, and how to reach it.
    picker_host: str = "127.0.0.1"
    picker_port: int = 9002
    picker_tls: bool = False
    picker_ca_file: str | None = None  # verify the picker's certificate; None: no verification
    picker_sni: str | None = None
    failure_mode: FailureMode = FailureMode.FAIL_CLOSE
    request_body_mode: BodyMode = BodyMode.FULL_DUPLEX_STREAMED
    response_body_mode: BodyMode = BodyMode.FULL_DUPLEX_STREAMED
    message_timeout_s: float = 1000.0
    # Active TCP health checks of the picker; None disables them. See the module docstring:
    # they are what lets FailOpen keep request bodies while the picker is down.
    picker_health_check_interval_s: float | None = 1.0
    subset_hint: tuple[str, ...] | None = None  # sets envoy.lb.subset_hint metadata when given
    # backends ("ip:port"): the pool in direct mode; the FailOpen / no-header fallback
    # in picker and original-dst mode.
    backends: tuple[str, ...] = ()
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    upstream_http2: bool = False  # InferencePool appProtocol kubernetes.io/h2c
    connect_timeout_s: float = 5.0
    route_timeout_s: float = 0.0  # 0 disables it: streamed completions can run for minutes
    stream_idle_timeout_s: float = 300.0
    buffer_limit_bytes: int = 32 * 1024 * 1024
    max_upstream_requests: int = 100_000  # circuit-breaker ceilings; Envoy's default is 1024
    access_log_path: str | None = None
    destination_header: str = DESTINATION_HEADER
    extra_clusters: tuple[dict[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", GatewayMode(self.mode))
        object.__setattr__(self, "failure_mode", FailureMode(self.failure_mode))
        object.__setattr__(self, "request_body_mode", BodyMode(self.request_body_mode))
        object.__setattr__(self, "response_body_mode", BodyMode(self.response_body_mode))
        object.__setattr__(self, "lb_policy", LbPolicy(self.lb_policy))
        object.__setattr__(self, "backends", tuple(self.backends))
        for name in ("listen_port", "admin_port", "picker_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name}={port} is not a TCP port (0-65535; 0 = any free port)")
        for backend in self.backends:
            parse_endpoint(backend)
        for hinted in self.subset_hint or ():
            parse_endpoint(hinted)
        if self.mode is GatewayMode.DIRECT and not self.backends:
            raise ValueError("mode 'direct' needs at least one backend ('ip:port') to balance over")
        if not 0 <= self.message_timeout_s <= _EXT_PROC_MAX_TIMEOUT_S:
            raise ValueError(
                f"message_timeout_s={self.message_timeout_s} is outside Envoy's 0-3600 s range"
            )
        if self.buffer_limit_bytes <= 0 or self.buffer_limit_bytes >= 2**32:
            raise ValueError("buffer_limit_bytes must fit in 32 bits and be positive")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``ip:port`` (IPv6 as ``[addr]:port``) into an IP string and a port."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not 'ip:port'")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r}: {host!r} is not an IP address") from None
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError(f"endpoint {endpoint!r}: port {port} is out of range")
    return host, port


def render_bootstrap(options: GatewayOptions) -> dict[str, Any]:
    """The complete Envoy bootstrap for `options`, as JSON-ready data."""
    clusters = list(_clusters(options)) + [dict(c) for c in options.extra_clusters]
    return {
        "admin": {"address": _socket_address(options.admin_host, options.admin_port)},
        "static_resources": {"listeners": [_listener(options)], "clusters": clusters},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE + "envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50_000,
                    },
                }
            ]
        },
    }


def write_bootstrap(config: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write `config` as ``envoy.json`` in `directory` and return the path."""
    path = Path(directory) / "envoy.json"
    path.write_text(json.dumps(config, indent=2))
    return path


# -- listener and HTTP filters ---------------------------------------------------------


def _listener(options: GatewayOptions) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(options.stream_idle_timeout_s),
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [{"name": "pool", "domains": ["*"], "routes": _routes(options)}],
        },
        "http_filters": [*_http_filters(options), _router_filter()],
    }
    if options.access_log_path:
        hcm["access_log"] = [_file_access_log(options.access_log_path)]
    return {
        "name": "gateway",
        "address": _socket_address(options.listen_host, options.listen_port),
        "per_connection_buffer_limit_bytes": options.buffer_limit_bytes,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _http_filters(options: GatewayOptions) -> list[dict[str, Any]]:
    if options.mode is not GatewayMode.PICKER:
        return []
    filters = [_strip_destination_filter(options)]
    if options.subset_hint is not None:
        filters.append(_subset_hint_filter(options.subset_hint))
    filters.append(_ext_proc_filter(options))
    return filters


def _strip_destination_filter(options: GatewayOptions) -> dict[str, Any]:
    return {
        "name": "sluice.strip_client_destination",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": options.destination_header}]},
        },
    }


def _subset_hint_filter(endpoints: tuple[str, ...]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [
                {
                    "metadata_namespace": SUBSET_HINT_NAMESPACE,
                    "value": {SUBSET_HINT_KEY: list(endpoints)},
                }
            ],
        },
    }


def _ext_proc_filter(options: GatewayOptions) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": PICKER_CLUSTER}},
            "failure_mode_allow": options.failure_mode is FailureMode.FAIL_OPEN,
            "processing_mode": _processing_mode(options),
            "message_timeout": _duration(options.message_timeout_s),
            "allow_mode_override": True,
            "route_cache_action": "CLEAR",
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [SUBSET_HINT_NAMESPACE]},
                "receiving_namespaces": {"untyped": [LB_METADATA_NAMESPACE]},
            },
        },
    }


def _processing_mode(options: GatewayOptions) -> dict[str, str]:
    # Envoy rejects FULL_DUPLEX_STREAMED unless that direction's trailer mode is SEND:
    # the trailers message is how the processor learns the body ended when trailers exist.
    def trailer(body: BodyMode) -> str:
        return "SEND" if body is BodyMode.FULL_DUPLEX_STREAMED else "SKIP"

    return {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": options.request_body_mode.value,
        "response_body_mode": options.response_body_mode.value,
        "request_trailer_mode": trailer(options.request_body_mode),
        "response_trailer_mode": trailer(options.response_body_mode),
    }


def _router_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
    }


def _file_access_log(path: str) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": _TYPE + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {
                "text_format_source": {
                    "inline_string": '[%START_TIME%] "%REQ(:METHOD)% %REQ(:PATH)%" '
                    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% "
                    "%DURATION%ms upstream=%UPSTREAM_HOST% "
                    f"dest=%REQ({DESTINATION_HEADER})% "
                    f"lb=%DYNAMIC_METADATA({LB_METADATA_NAMESPACE}:{DESTINATION_HEADER})%\n"
                }
            },
        },
    }


# -- routes ----------------------------------------------------------------------------


def _routes(options: GatewayOptions) -> list[dict[str, Any]]:
    if options.mode is GatewayMode.DIRECT:
        return [_route(POOL_CLUSTER, options)]
    with_header = _route(ORIGINAL_DST_CLUSTER, options)
    with_header["match"]["headers"] = [{"name": options.destination_header, "present_match": True}]
    if options.backends:
        without_header = _route(POOL_CLUSTER, options)
    else:
        without_header = {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 503,
                "body": {
                    "inline_string": f"no destination endpoint: the request carries no "
                    f"{options.destination_header} header and this gateway has no "
                    "fallback backends\n"
                },
            },
        }
    return [with_header, without_header]


def _route(cluster: str, options: GatewayOptions) -> dict[str, Any]:
    return {
        "match": {"prefix": "/"},
        "route": {"cluster": cluster, "timeout": _duration(options.route_timeout_s)},
    }


# -- clusters --------------------------------------------------------------------------


def _clusters(options: GatewayOptions) -> list[dict[str, Any]]:
    clusters = []
    if options.mode is GatewayMode.PICKER:
        clusters.append(_picker_cluster(options))
    if options.mode is not GatewayMode.DIRECT:
        clusters.append(_original_dst_cluster(options))
    if options.backends:
        clusters.append(_pool_cluster(options))
    return clusters


def _picker_cluster(options: GatewayOptions) -> dict[str, Any]:
    cluster = {
        "name": PICKER_CLUSTER,
        "type": _discovery_type(options.picker_host),
        "connect_timeout": _duration(options.connect_timeout_s),
        "per_connection_buffer_limit_bytes": options.buffer_limit_bytes,
        "typed_extension_protocol_options": _http_protocol_options(http2=True),
        "circuit_breakers": _circuit_breakers(options),
        "load_assignment": _load_assignment(
            PICKER_CLUSTER, [(options.picker_host, options.picker_port)]
        ),
    }
    if options.picker_tls:
        cluster["transport_socket"] = _picker_tls(options)
    if options.picker_health_check_interval_s is not None:
        interval = _duration(options.picker_health_check_interval_s)
        cluster["health_checks"] = [
            {
                "timeout": interval,
                "interval": interval,
                "no_traffic_interval": interval,  # default 60 s would slow down recovery
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "tcp_health_check": {},
            }
        ]
        # Without panic routing an unhealthy picker means "no healthy upstream": the ext_proc
        # stream then fails while it is being opened, before Envoy hands it any body.
        cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return cluster


def _picker_tls(options: GatewayOptions) -> dict[str, Any]:
    common: dict[str, Any] = {"alpn_protocols": ["h2"]}
    if options.picker_ca_file:
        common["validation_context"] = {"trusted_ca": {"filename": options.picker_ca_file}}
    context: dict[str, Any] = {
        "@type": _TYPE + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common,
    }
    if options.picker_sni:
        context["sni"] = options.picker_sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _original_dst_cluster(options: GatewayOptions) -> dict[str, Any]:
    return {
        "name": ORIGINAL_DST_CLUSTER,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": options.destination_header,
        },
        "connect_timeout": _duration(options.connect_timeout_s),
        "per_connection_buffer_limit_bytes": options.buffer_limit_bytes,
        "circuit_breakers": _circuit_breakers(options),
        **_upstream_protocol(options),
    }


def _pool_cluster(options: GatewayOptions) -> dict[str, Any]:
    return {
        "name": POOL_CLUSTER,
        "type": "STATIC",
        "lb_policy": options.lb_policy.value,
        "connect_timeout": _duration(options.connect_timeout_s),
        "per_connection_buffer_limit_bytes": options.buffer_limit_bytes,
        "circuit_breakers": _circuit_breakers(options),
        "load_assignment": _load_assignment(
            POOL_CLUSTER, [parse_endpoint(b) for b in options.backends]
        ),
        **_upstream_protocol(options),
    }


def _upstream_protocol(options: GatewayOptions) -> dict[str, Any]:
    if not options.upstream_http2:
        return {}
    return {"typed_extension_protocol_options": _http_protocol_options(http2=True)}


def _http_protocol_options(*, http2: bool) -> dict[str, Any]:
    explicit: dict[str, Any] = {"http2_protocol_options" if http2 else "http_protocol_options": {}}
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": explicit,
        }
    }


def _circuit_breakers(options: GatewayOptions) -> dict[str, Any]:
    ceiling = options.max_upstream_requests
    return {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": ceiling,
                "max_pending_requests": ceiling,
                "max_requests": ceiling,
                "max_retries": 3,
            }
        ]
    }


def _load_assignment(name: str, hosts: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": _socket_address(host, port)}} for host, port in hosts
                ]
            }
        ],
    }


def _discovery_type(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "STRICT_DNS"
    return "STATIC"


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"
