"""The rendered bootstraps: option checks, and Envoy's own validation of every variant."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sluice.gateway import envoy_config, envoy_process
from sluice.gateway.settings import (
    BodyMode,
    DestinationCluster,
    FailureMode,
    GatewayMode,
    GatewayOptions,
    LbPolicy,
)
from tests.gateway import tls


def _ext_proc(bootstrap: dict[str, Any]) -> dict[str, Any]:
    filters = _hcm(bootstrap)["http_filters"]
    [ext_proc] = [f for f in filters if f["name"] == "envoy.filters.http.ext_proc"]
    return dict(ext_proc["typed_config"])


def _hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    listener = bootstrap["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def _clusters(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def test_shipped_body_modes_let_the_picker_skip_response_bodies() -> None:
    """What Sluice ships: a buffered request body and a streamed response body, so that
    the picker's mode_override (allowed) can turn response bodies off per request."""
    ext_proc = _ext_proc(envoy_config.render_bootstrap(GatewayOptions(picker_port=9002)))
    assert ext_proc["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "STREAMED",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    assert ext_proc["allow_mode_override"] is True


def test_picker_defaults_match_the_endpoint_picker_protocol() -> None:
    full_duplex = BodyMode.FULL_DUPLEX_STREAMED
    bootstrap = envoy_config.render_bootstrap(
        GatewayOptions(
            picker_port=9002, request_body_mode=full_duplex, response_body_mode=full_duplex
        )
    )
    ext_proc = _ext_proc(bootstrap)
    assert ext_proc["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SEND",
        "request_body_mode": "FULL_DUPLEX_STREAMED",
        "response_body_mode": "FULL_DUPLEX_STREAMED",
        "request_trailer_mode": "SEND",
        "response_trailer_mode": "SEND",
    }
    assert ext_proc["failure_mode_allow"] is False  # FailClose is the InferencePool default
    assert ext_proc["allow_mode_override"] is True
    assert ext_proc["message_timeout"] == "20.000s"
    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
    clusters = _clusters(bootstrap)
    original_dst = clusters[envoy_config.ORIGINAL_DST_CLUSTER]
    assert original_dst["type"] == "ORIGINAL_DST"
    assert original_dst["lb_policy"] == "CLUSTER_PROVIDED"
    assert original_dst["original_dst_lb_config"] == {
        "use_http_header": True,
        "http_header_name": "x-gateway-destination-endpoint",
    }
    picker = clusters[envoy_config.PICKER_CLUSTER]
    assert "http2_protocol_options" in str(picker["typed_extension_protocol_options"])
    assert "transport_socket" not in picker
    routes = _hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["route"]["timeout"] == "3600.000s"
    # Full duplex: no retry policy (a body with trailers would reach the upstream twice).
    assert "retry_policy" not in routes[0]["route"]


def test_every_request_is_bounded_by_default() -> None:
    bootstrap = envoy_config.render_bootstrap(GatewayOptions())
    hcm = _hcm(bootstrap)
    assert (hcm["stream_idle_timeout"], hcm["request_timeout"], hcm["request_headers_timeout"]) == (
        "60.000s",
        "30.000s",
        "10.000s",
    )
    [with_header, _] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert with_header["route"]["timeout"] == "3600.000s"
    assert with_header["route"]["retry_policy"] == {
        "retry_on": "connect-failure,refused-stream,reset-before-request",
        "num_retries": 2,
    }


def test_override_host_routes_the_pickers_list_over_the_backends() -> None:
    options = GatewayOptions(
        destination_cluster=DestinationCluster.OVERRIDE_HOST,
        backends=("10.0.0.1:8000", "10.0.0.2:8000"),
        lb_policy=LbPolicy.LEAST_REQUEST,
    )
    bootstrap = envoy_config.render_bootstrap(options)
    assert set(_clusters(bootstrap)) == {envoy_config.PICKER_CLUSTER, envoy_config.POOL_CLUSTER}
    [policy] = _clusters(bootstrap)["pool"]["load_balancing_policy"]["policies"]
    config = policy["typed_extension_config"]["typed_config"]
    assert config["override_host_sources"] == [
        {"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}}
    ]
    [fallback] = config["fallback_policy"]["policies"]
    assert fallback["typed_extension_config"]["name"] == (
        "envoy.load_balancing_policies.least_request"
    )
    [route] = _hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == "pool"
    predicates = route["route"]["retry_policy"]["retry_host_predicate"]
    assert [p["name"] for p in predicates] == ["envoy.retry_host_predicates.previous_hosts"]


def test_fail_open_sets_failure_mode_allow() -> None:
    options = GatewayOptions(failure_mode=FailureMode.FAIL_OPEN)
    assert _ext_proc(envoy_config.render_bootstrap(options))["failure_mode_allow"] is True


def test_failure_mode_accepts_the_pool_spelling() -> None:
    assert GatewayOptions(failure_mode="FailOpen").failure_mode is FailureMode.FAIL_OPEN  # type: ignore[arg-type]


@pytest.mark.parametrize("body_mode", [BodyMode.BUFFERED, BodyMode.NONE, BodyMode.STREAMED])
def test_trailers_are_only_sent_for_full_duplex(body_mode: BodyMode) -> None:
    options = GatewayOptions(
        request_body_mode=BodyMode.FULL_DUPLEX_STREAMED, response_body_mode=body_mode
    )
    mode = _ext_proc(envoy_config.render_bootstrap(options))["processing_mode"]
    assert mode["response_body_mode"] == body_mode.value
    assert mode["response_trailer_mode"] == "SKIP"
    assert mode["request_trailer_mode"] == "SEND"


def test_tls_to_the_picker_without_and_with_a_ca(tmp_path: Path) -> None:
    options = GatewayOptions(picker_tls=True)
    socket = _clusters(envoy_config.render_bootstrap(options))["endpoint_picker"]
    context = socket["transport_socket"]["typed_config"]["common_tls_context"]
    assert "validation_context" not in context  # self-signed picker cert: no verification
    ca = str(tmp_path / "ca.pem")
    options = GatewayOptions(picker_tls=True, picker_ca_file=ca, picker_sni="picker")
    socket = _clusters(envoy_config.render_bootstrap(options))["endpoint_picker"]
    tls = socket["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == ca
    assert tls["sni"] == "picker"


def test_picker_host_name_uses_dns() -> None:
    options = GatewayOptions(picker_host="picker.sluice.svc")
    assert _clusters(envoy_config.render_bootstrap(options))["endpoint_picker"]["type"] == (
        "STRICT_DNS"
    )


def test_one_picker_by_default_is_one_endpoint() -> None:
    picker = _clusters(envoy_config.render_bootstrap(GatewayOptions(picker_port=9100)))[
        envoy_config.PICKER_CLUSTER
    ]
    [endpoint] = picker["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9100,
    }


def test_picker_replicas_are_one_round_robin_cluster_with_health_checks() -> None:
    options = GatewayOptions(
        picker_port=9100,  # ignored: picker_endpoints replaces the single picker
        picker_endpoints=(("127.0.0.1", 9002), ("127.0.0.2", 9002), ("127.0.0.1", 9003)),
    )
    bootstrap = envoy_config.render_bootstrap(options)
    picker = _clusters(bootstrap)[envoy_config.PICKER_CLUSTER]
    assert picker["type"] == "STATIC"
    assert picker["lb_policy"] == "ROUND_ROBIN"
    endpoints = picker["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in endpoints] == [
        {"address": "127.0.0.1", "port_value": 9002},
        {"address": "127.0.0.2", "port_value": 9002},
        {"address": "127.0.0.1", "port_value": 9003},
    ]
    [check] = picker["health_checks"]
    assert check["tcp_health_check"] == {} and check["unhealthy_threshold"] == 1
    assert picker["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}
    # Still one ext_proc filter, streaming to the one cluster.
    assert _ext_proc(bootstrap)["grpc_service"] == {
        "envoy_grpc": {"cluster_name": envoy_config.PICKER_CLUSTER}
    }


def test_picker_replicas_named_by_dns_use_dns() -> None:
    options = GatewayOptions(picker_endpoints=(("127.0.0.1", 9002), ("picker-1.sluice", 9002)))
    picker = _clusters(envoy_config.render_bootstrap(options))[envoy_config.PICKER_CLUSTER]
    assert picker["type"] == "STRICT_DNS"


def test_direct_mode_has_no_ext_proc_and_balances_the_pool() -> None:
    options = GatewayOptions(mode=GatewayMode.DIRECT, backends=("10.0.0.1:8000", "[::1]:8001"))
    bootstrap = envoy_config.render_bootstrap(options)
    names = [f["name"] for f in _hcm(bootstrap)["http_filters"]]
    assert names == ["envoy.filters.http.router"]
    assert set(_clusters(bootstrap)) == {"pool"}
    endpoints = _clusters(bootstrap)["pool"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in endpoints]
    assert addresses == [
        {"address": "10.0.0.1", "port_value": 8000},
        {"address": "::1", "port_value": 8001},
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": GatewayMode.DIRECT}, "needs at least one backend"),
        ({"backends": ("localhost:80",)}, "not an IP address"),
        ({"backends": ("10.0.0.1",)}, "not 'ip:port'"),
        ({"backends": ("10.0.0.1:0",)}, "out of range"),
        ({"listen_port": 70000}, "listen_port=70000"),
        ({"message_timeout_s": 7200}, "0-3600"),
        ({"message_timeout_s": 30}, "must be below request_timeout_s=30.0"),
        ({"stream_idle_timeout_s": -1}, "stream_idle_timeout_s=-1 is negative"),
        ({"connect_retries": -1}, "connect_retries=-1"),
        ({"destination_cluster": "override-host"}, "'override-host' needs backends"),
        ({"destination_cluster": "dns"}, "'dns' is not a valid DestinationCluster"),
        ({"mode": "sideways"}, "sideways"),
        ({"picker_endpoints": (("127.0.0.1", 0),)}, "port 1-65535"),
        ({"picker_endpoints": (("", 9002),)}, "needs a host"),
        ({"picker_endpoints": (("127.0.0.1", 9002),) * 2}, "duplicates"),
    ],
)
def test_bad_options_are_rejected_with_the_reason(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayOptions(**kwargs)


def test_write_bootstrap_writes_json(tmp_path: Path) -> None:
    path = envoy_config.write_bootstrap({"admin": {}}, tmp_path)
    assert path.name == "envoy.json" and path.read_text().startswith("{")


_VARIANTS = [
    GatewayOptions(mode=GatewayMode.DIRECT, backends=("127.0.0.1:8000",)),
    GatewayOptions(mode=GatewayMode.DIRECT, backends=("127.0.0.1:8000",), upstream_http2=True),
    GatewayOptions(mode=GatewayMode.ORIGINAL_DST),
    GatewayOptions(mode=GatewayMode.ORIGINAL_DST, backends=("127.0.0.1:8000",)),
    GatewayOptions(
        mode=GatewayMode.ORIGINAL_DST,
        destination_cluster=DestinationCluster.OVERRIDE_HOST,
        backends=("127.0.0.1:8000",),
        lb_policy=LbPolicy.LEAST_REQUEST,
    ),
    GatewayOptions(destination_cluster=DestinationCluster.OVERRIDE_HOST, backends=("[::1]:80",)),
    GatewayOptions(route_timeout_s=0, stream_idle_timeout_s=0, request_timeout_s=0),
    GatewayOptions(picker_tls=True, subset_hint=("127.0.0.1:8000",), access_log_path="/dev/null"),
    GatewayOptions(picker_host="localhost", picker_tls=True, picker_ca_file="<generated>"),
    GatewayOptions(picker_endpoints=(("127.0.0.1", 9002), ("127.0.0.1", 9003))),
    GatewayOptions(picker_endpoints=(("localhost", 9002), ("127.0.0.1", 9003)), picker_tls=True),
    *(
        GatewayOptions(request_body_mode=req, response_body_mode=resp, failure_mode=failure)
        for req, resp, failure in itertools.product(
            [BodyMode.FULL_DUPLEX_STREAMED, BodyMode.BUFFERED],
            list(BodyMode),
            list(FailureMode),
        )
    ),
]


@pytest.mark.envoy
@pytest.mark.parametrize("options", _VARIANTS, ids=lambda o: f"{o.mode}")
def test_envoy_accepts_every_variant(options: GatewayOptions, tmp_path: Path) -> None:
    if options.picker_ca_file:  # Envoy checks that the CA file exists and parses
        options = dataclasses.replace(options, picker_ca_file=str(tls.self_signed(tmp_path)[0]))
    path = envoy_config.write_bootstrap(envoy_config.render_bootstrap(options), tmp_path)
    result = subprocess.run(
        [envoy_process.find_envoy_binary(), "--mode", "validate", "-c", str(path),
         "--disable-hot-restart", "-l", "error"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
