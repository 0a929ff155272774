"""Value types of the datastore and the snapshot that groups them."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NewType

EndpointKey = NewType("EndpointKey", str)
"""`<namespace>/<pod>-rank-<i>`: stable across snapshots while the pod and port stay."""

ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
DEFAULT_ENGINE = "vllm"

_EMPTY: Mapping[str, str] = MappingProxyType({})


def host_port(address: str, port: int) -> str:
    """`ip:port`, with IPv6 addresses bracketed as Envoy's original-destination header wants."""
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model-server target: a pod's IP and one of the pool's target ports."""

    key: EndpointKey
    pod_name: str
    namespace: str
    address: str
    port: int
    rank: int = 0
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    engine: str = DEFAULT_ENGINE
    # The pod's annotations (e.g. the port its KV-cache events are published on).
    annotations: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    # Precomputed because every routed request sends it in a header.
    target: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.target:
            object.__setattr__(self, "target", host_port(self.address, self.port))


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The `InferencePool` the picker serves."""

    name: str
    namespace: str
    selector: Mapping[str, str]
    target_ports: tuple[int, ...]
    app_protocol: str = "http"
    failure_mode: str = "FailClose"


@dataclass(frozen=True, slots=True)
class Objective:
    """An `InferenceObjective`: a name clients send in `x-gateway-inference-objective`."""

    name: str
    namespace: str
    priority: int = 0


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    model: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """Models matched exactly (empty = catch-all) and the weighted targets they go to."""

    exact_models: tuple[str, ...]
    targets: tuple[RewriteTarget, ...]


@dataclass(frozen=True, slots=True)
class ModelRewrite:
    name: str
    namespace: str
    created: str  # RFC 3339 creationTimestamp; older objects win ties
    rules: tuple[RewriteRule, ...]


@dataclass(frozen=True, slots=True)
class SloTargets:
    ttft_ms: float | None = None
    tpot_ms: float | None = None


@dataclass(frozen=True, slots=True)
class WorkloadLimits:
    max_concurrent_requests: int | None = None
    requests_per_second: float | None = None
    burst: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadClass:
    """`sluice.dev/v1alpha1` WorkloadClass: what a workload may claim and its defaults."""

    name: str
    namespace: str
    workload_id: str
    criticality: int = 3
    slo: SloTargets = SloTargets()
    limits: WorkloadLimits = WorkloadLimits()
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a request routes over, fixed for the request's lifetime."""

    version: int = 0
    pool: PoolSpec | None = None
    endpoints: tuple[Endpoint, ...] = ()
    objectives: Mapping[str, Objective] = field(default_factory=lambda: MappingProxyType({}))
    # Rewrite rules resolved once per snapshot: exact model -> targets, and the catch-all.
    rewrites_exact: Mapping[str, tuple[RewriteTarget, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    rewrite_catch_all: tuple[RewriteTarget, ...] = ()
    workload_classes: Mapping[str, WorkloadClass] = field(
        default_factory=lambda: MappingProxyType({})
    )
    synced: bool = False

    def rewrite_targets(self, model: str) -> tuple[RewriteTarget, ...]:
        return self.rewrites_exact.get(model, self.rewrite_catch_all)
