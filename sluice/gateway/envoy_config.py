"""Envoy bootstrap configurations for running Sluice behind a real Envoy.

`render_bootstrap(options)` turns one `settings.GatewayOptions` value into an Envoy v3
bootstrap (a plain dict; `write_bootstrap` writes it as JSON). Three shapes exist:

* ``picker`` — the Gateway API Inference Extension data path: the ext_proc filter streams
  every request to the endpoint picker over gRPC (HTTP/2, optionally TLS); the picker
  answers with the ``x-gateway-destination-endpoint: ip:port`` header and the router sends
  the request to an ``ORIGINAL_DST`` cluster that reads its destination from that header.
* ``original-dst`` — the same routing without ext_proc: the *client* names the backend in
  the header. A baseline with the same routing work as ``picker``, minus the picker.
* ``direct`` — a ``STATIC`` cluster of the backends balanced by Envoy itself (round robin
  or least request): the baseline for benchmarks.

Routes. ``picker`` and ``original-dst`` have two: requests carrying the destination header
go to the ``ORIGINAL_DST`` cluster; requests without it go to the pool's backends
(`GatewayOptions.backends`) round robin, or, when none are configured, get a 503 whose body
names the missing header. The route is chosen again after the picker's header answer
(``route_cache_action: CLEAR``, so even a picker that forgets ``clear_route_cache`` is
routed). In ``picker`` mode a header-mutation filter ahead of ext_proc removes any
destination header the client sent: clients cannot pick their own backend. With
``DestinationCluster.OVERRIDE_HOST`` there is one route, to the pool's backends balanced by
the override_host policy (`envoy_routing`: retries on the picker's fallbacks).

Bounds. Every request ends: the HTTP connection manager's ``stream_idle_timeout`` (a hung
model server), ``request_timeout`` and ``request_headers_timeout`` (a trickling client,
408), the route's whole-response ``timeout`` and ext_proc's ``message_timeout`` (a hung
picker, below ``request_timeout`` so the failure mode applies). `settings.GatewayOptions`
holds the values and why.

FailOpen / FailClose. FailClose (``failure_mode_allow: false``) answers 500 whenever the
picker cannot be reached or its stream fails. FailOpen lets the request continue without a
destination header, so the fallback route above serves it from the pool — but with
``FULL_DUPLEX_STREAMED`` Envoy hands body chunks to the gRPC stream without waiting, and if
the stream fails *after* that (connection refused is only learnt asynchronously) the body is
gone and Envoy answers 500 even with FailOpen. Header-only requests and BUFFERED request
bodies are not affected. The picker cluster therefore has an active TCP health check
(`picker_health_check_interval_s`, 1 s) and no panic routing: once a dead picker is noticed
the ext_proc stream fails while being opened, before any body is handed over, and FailOpen
requests reach the pool with their bodies intact. Requests inside the detection window (at
most one interval), or cut off by a picker that dies mid-stream, still get 500.

Replicas. `GatewayOptions.picker_endpoints` puts several pickers in the one ext_proc cluster,
balanced round robin per ext_proc stream (that is, per request), each health checked as
above. Nothing makes one client's requests stick to one replica: each replica must see every
model server's state itself (for precise prefix routing, every pod's KV events).
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from sluice.gateway import envoy_routing
from sluice.gateway.settings import (
    DESTINATION_HEADER,
    LB_METADATA_NAMESPACE,
    SUBSET_HINT_KEY,
    SUBSET_HINT_NAMESPACE,
    BodyMode,
    FailureMode,
    GatewayMode,
    GatewayOptions,
    parse_endpoint,
)

PICKER_CLUSTER = "endpoint_picker"
ORIGINAL_DST_CLUSTER = envoy_routing.ORIGINAL_DST_CLUSTER
POOL_CLUSTER = envoy_routing.POOL_CLUSTER

_TYPE = envoy_routing.TYPE_URL
_duration = envoy_routing.duration


def render_bootstrap(options: GatewayOptions) -> dict[str, Any]:
    """The complete Envoy bootstrap for `options`, as JSON-ready data."""
    clusters = _clusters(options)
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
        "request_timeout": _duration(options.request_timeout_s),
        "request_headers_timeout": _duration(options.request_headers_timeout_s),
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [
                {"name": "pool", "domains": ["*"], "routes": envoy_routing.routes(options)}
            ],
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


# -- clusters --------------------------------------------------------------------------


def _clusters(options: GatewayOptions) -> list[dict[str, Any]]:
    clusters = []
    if options.mode is GatewayMode.PICKER:
        clusters.append(_picker_cluster(options))
    if options.mode is not GatewayMode.DIRECT and not envoy_routing.overrides_host(options):
        clusters.append(_original_dst_cluster(options))
    if options.backends:
        clusters.append(_pool_cluster(options))
    return clusters


def _picker_cluster(options: GatewayOptions) -> dict[str, Any]:
    pickers = options.pickers
    dns = any(_discovery_type(host) == "STRICT_DNS" for host, _ in pickers)
    cluster: dict[str, Any] = {
        "name": PICKER_CLUSTER,
        "type": "STRICT_DNS" if dns else "STATIC",
        # Each request's ext_proc stream is balanced on its own (one HTTP/2 stream per
        # request), so replicas share the requests even over long-lived connections.
        "lb_policy": "ROUND_ROBIN",
        "connect_timeout": _duration(options.connect_timeout_s),
        "per_connection_buffer_limit_bytes": options.buffer_limit_bytes,
        "typed_extension_protocol_options": _http_protocol_options(http2=True),
        "circuit_breakers": _circuit_breakers(options),
        "load_assignment": _load_assignment(PICKER_CLUSTER, list(pickers)),
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
        # stream then fails while it is being opened, before Envoy hands it any body. With
        # several replicas the healthy ones take the streams of one that is down.
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
    cluster: dict[str, Any] = {"name": POOL_CLUSTER, "type": "STATIC"}
    if envoy_routing.overrides_host(options):
        cluster["load_balancing_policy"] = envoy_routing.override_host_policy(options)
    else:
        cluster["lb_policy"] = options.lb_policy.value
    return {
        **cluster,
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
