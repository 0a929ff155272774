"""What varies between the Envoy configurations Sluice runs: one frozen `GatewayOptions`.

`envoy_config.render_bootstrap` turns it into an Envoy bootstrap; `envoy_process.EnvoyProcess`
runs it. The enums accept their string spellings too (``GatewayMode("original-dst")``,
``FailureMode("FailOpen")`` as in an InferencePool's ``endpointPickerRef.failureMode``).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
LB_METADATA_NAMESPACE = "envoy.lb"

_EXT_PROC_MAX_TIMEOUT_S = 3600.0  # upper bound enforced by Envoy's config validation
_TIMEOUTS = (
    "route_timeout_s",
    "stream_idle_timeout_s",
    "request_timeout_s",
    "request_headers_timeout_s",
)


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


class DestinationCluster(enum.StrEnum):
    """How the chosen ``ip:port`` becomes an upstream host (picker and original-dst modes)."""

    # Any address, no list of endpoints needed; a failed connection is retried on the same
    # endpoint, since the cluster can only read one address from the header.
    ORIGINAL_DST = "original-dst"
    # Only the `backends`; the override_host policy reads the picker's whole list (primary,
    # then fallbacks), so a failed connection is retried on the next endpoint in it.
    OVERRIDE_HOST = "override-host"


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
    # Several picker replicas behind this one Envoy: (host, port) of each; when given, they
    # replace picker_host/picker_port. Each ext_proc stream (one per request) goes to one
    # replica, round robin, so replicas must each hold the whole view (see docs on replicas).
    picker_endpoints: tuple[tuple[str, int], ...] = ()
    picker_tls: bool = False
    picker_ca_file: str | None = None  # verify the picker's certificate; None: no verification
    picker_sni: str | None = None
    failure_mode: FailureMode = FailureMode.FAIL_CLOSE
    # What Sluice ships: the request body in one message (answered without sending it
    # back unless the model was rewritten) and a streamed response whose body the picker
    # switches off per request (mode_override) when nothing needs it. Gateways configured
    # by others send FULL_DUPLEX_STREAMED both ways; the picker serves both.
    request_body_mode: BodyMode = BodyMode.BUFFERED
    response_body_mode: BodyMode = BodyMode.STREAMED
    # Bounds the picker's answer to each message, flow control queue waits included; below
    # request_timeout_s so a hung picker meets the failure mode, not the client deadline.
    message_timeout_s: float = 20.0
    # Active TCP health checks of the picker; None disables them. See the module docstring:
    # they are what lets FailOpen keep request bodies while the picker is down.
    picker_health_check_interval_s: float | None = 1.0
    subset_hint: tuple[str, ...] | None = None  # sets envoy.lb.subset_hint metadata when given
    # backends ("ip:port"): the pool in direct mode; the FailOpen / no-header fallback
    # in picker and original-dst mode.
    backends: tuple[str, ...] = ()
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    destination_cluster: DestinationCluster = DestinationCluster.ORIGINAL_DST
    upstream_http2: bool = False  # InferencePool appProtocol kubernetes.io/h2c
    connect_timeout_s: float = 5.0
    # Timeouts; 0 disables one. The idle timeout (no bytes either way) is what ends the
    # requests of a model server that accepts and never answers, while a stream that keeps
    # sending lives on; a non-streamed answer must start within it. The route timeout
    # bounds the whole response, generously: long generations stream for many minutes.
    route_timeout_s: float = 3600.0
    stream_idle_timeout_s: float = 60.0
    # From the first byte until the request is sent upstream (the picker's answer included):
    # a client trickling its body gets 408. The picker's --request-body-timeout should match.
    request_timeout_s: float = 30.0
    request_headers_timeout_s: float = 10.0
    # Retries of a request that never reached a model server (connection refused or reset
    # before the request was sent): never a retry of work a server may have started.
    connect_retries: int = 2
    buffer_limit_bytes: int = 32 * 1024 * 1024
    max_upstream_requests: int = 100_000  # circuit-breaker ceilings; Envoy's default is 1024
    access_log_path: str | None = None
    destination_header: str = DESTINATION_HEADER

    @property
    def pickers(self) -> tuple[tuple[str, int], ...]:
        """Every picker replica's (host, port): `picker_endpoints`, or the single picker."""
        return self.picker_endpoints or ((self.picker_host, self.picker_port),)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", GatewayMode(self.mode))
        object.__setattr__(self, "failure_mode", FailureMode(self.failure_mode))
        object.__setattr__(self, "request_body_mode", BodyMode(self.request_body_mode))
        object.__setattr__(self, "response_body_mode", BodyMode(self.response_body_mode))
        object.__setattr__(self, "lb_policy", LbPolicy(self.lb_policy))
        object.__setattr__(
            self, "destination_cluster", DestinationCluster(self.destination_cluster)
        )
        object.__setattr__(self, "backends", tuple(self.backends))
        object.__setattr__(
            self, "picker_endpoints", tuple((host, port) for host, port in self.picker_endpoints)
        )
        for name in ("listen_port", "admin_port", "picker_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name}={port} is not a TCP port (0-65535; 0 = any free port)")
        for host, port in self.picker_endpoints:
            if not host or not 0 < port <= 65535:
                raise ValueError(f"picker endpoint {host}:{port} needs a host and a port 1-65535")
        if len(set(self.picker_endpoints)) != len(self.picker_endpoints):
            raise ValueError(f"picker_endpoints has duplicates: {self.picker_endpoints}")
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
        for name in _TIMEOUTS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is negative (0 disables it)")
        if 0 < self.request_timeout_s <= self.message_timeout_s:
            raise ValueError(
                f"message_timeout_s={self.message_timeout_s} must be below request_timeout_s="
                f"{self.request_timeout_s}: the request deadline includes the picker's answer"
            )
        if self.connect_retries < 0:
            raise ValueError(f"connect_retries={self.connect_retries} is negative (0 disables)")
        if self.destination_cluster is DestinationCluster.OVERRIDE_HOST and not self.backends:
            raise ValueError(
                "destination_cluster 'override-host' needs backends: every endpoint the "
                "picker may choose ('ip:port')"
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
