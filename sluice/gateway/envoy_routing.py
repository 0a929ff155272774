"""Where a routed request goes, how long it may take, and where a failed attempt goes next.

Routes carry the whole-response timeout and the retry policy; `override_host_policy` is the
pool cluster's load balancing when `DestinationCluster.OVERRIDE_HOST` is chosen. Retries
cover only failures no model server saw (connection refused, reset before the request was
sent), so no generation runs twice. With the ``ORIGINAL_DST`` cluster a retry can only go
to the same endpoint (the cluster reads one address); override_host reads the picker's
``primary,fallback,...`` list from the ``envoy.lb`` metadata and takes the next listed
endpoint on each attempt, but only endpoints the cluster knows (`GatewayOptions.backends`).
"""

from __future__ import annotations

from typing import Any

from sluice.gateway.settings import (
    DESTINATION_HEADER,
    LB_METADATA_NAMESPACE,
    BodyMode,
    DestinationCluster,
    GatewayMode,
    GatewayOptions,
    LbPolicy,
)

ORIGINAL_DST_CLUSTER = "pool_original_dst"
POOL_CLUSTER = "pool"

TYPE_URL = "type.googleapis.com/"


def routes(options: GatewayOptions) -> list[dict[str, Any]]:
    if options.mode is GatewayMode.DIRECT or overrides_host(options):
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
    action: dict[str, Any] = {"cluster": cluster, "timeout": duration(options.route_timeout_s)}
    if options.connect_retries and not _streams_request_to_picker(options):
        action["retry_policy"] = _retry_policy(options)
    return {"match": {"prefix": "/"}, "route": action}


def _streams_request_to_picker(options: GatewayOptions) -> bool:
    # Measured with Envoy 1.40: a retry policy on the route while ext_proc streams the
    # request full duplex makes Envoy send the body upstream twice when the request has
    # trailers. No retries there rather than a corrupted body.
    return (
        options.mode is GatewayMode.PICKER
        and options.request_body_mode is BodyMode.FULL_DUPLEX_STREAMED
    )


def _retry_policy(options: GatewayOptions) -> dict[str, Any]:
    # Only failures where no model server saw the request: retrying anything later could
    # run a generation twice. The router keeps the request body for the retry.
    policy: dict[str, Any] = {
        "retry_on": "connect-failure,refused-stream,reset-before-request",
        "num_retries": options.connect_retries,
    }
    if overrides_host(options) or options.mode is GatewayMode.DIRECT:
        # Where a balancing policy picks (direct, or override_host once the picker's list is
        # used up), the retry avoids the hosts that already failed. override_host itself
        # moves to the next listed endpoint on each attempt.
        policy["retry_host_predicate"] = [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": TYPE_URL
                    + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ]
        policy["host_selection_retry_max_attempts"] = 5
    return policy


def overrides_host(options: GatewayOptions) -> bool:
    return (
        options.mode is not GatewayMode.DIRECT
        and options.destination_cluster is DestinationCluster.OVERRIDE_HOST
    )


def override_host_policy(options: GatewayOptions) -> dict[str, Any]:
    """Each attempt goes to the next endpoint of the chosen list that is in the cluster; a
    request without one (FailOpen, picker down) is balanced by `lb_policy`."""
    if options.mode is GatewayMode.PICKER:  # "primary,fallback,...", as the picker writes it
        source: dict[str, Any] = {
            "metadata": {"key": LB_METADATA_NAMESPACE, "path": [{"key": DESTINATION_HEADER}]}
        }
    else:  # the client's header, one endpoint
        source = {"header": options.destination_header}
    fallback = _FALLBACK_POLICIES[options.lb_policy]
    return _policy(
        "override_host",
        "override_host.v3.OverrideHost",
        override_host_sources=[source],
        fallback_policy=_policy(*fallback),
    )


_FALLBACK_POLICIES = {
    LbPolicy.ROUND_ROBIN: ("round_robin", "round_robin.v3.RoundRobin"),
    LbPolicy.LEAST_REQUEST: ("least_request", "least_request.v3.LeastRequest"),
}


def _policy(name: str, message: str, **config: Any) -> dict[str, Any]:
    """A `LoadBalancingPolicy` of one `envoy.load_balancing_policies.<name>` extension."""
    type_url = f"{TYPE_URL}envoy.extensions.load_balancing_policies.{message}"
    typed_config = {"@type": type_url, **config}
    extension = {"name": f"envoy.load_balancing_policies.{name}", "typed_config": typed_config}
    return {"policies": [{"typed_extension_config": extension}]}


def duration(seconds: float) -> str:
    return f"{seconds:.3f}s"
