"""Kubernetes-shaped objects (plain dicts, as the API returns them) into datastore values.

Each function validates what the picker relies on and raises :class:`ObjectError` with the
object's kind/namespace/name and the field at fault, so a broken manifest says what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from epp.datastore.snapshot import (
    ACTIVE_PORTS_ANNOTATION,
    DEFAULT_ENGINE,
    ENGINE_LABEL,
    Endpoint,
    EndpointKey,
    ModelRewrite,
    Objective,
    PoolSpec,
    RewriteRule,
    RewriteTarget,
    SloTargets,
    WorkloadClass,
    WorkloadLimits,
    is_ip_address,
)

POOL_GROUP = "inference.networking.k8s.io"
OBJECTIVE_GROUP = "inference.networking.x-k8s.io"
WORKLOAD_GROUP = "sluice.dev"

KINDS = ("Pod", "InferencePool", "InferenceObjective", "InferenceModelRewrite", "WorkloadClass")


class ObjectError(ValueError):
    """A Kubernetes object the picker cannot use, with the reason."""


def object_id(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')} {meta.get('namespace', 'default')}/{meta.get('name', '?')}"


def _fail(obj: Mapping[str, Any], message: str) -> ObjectError:
    return ObjectError(f"{object_id(obj)}: {message}")


def _mapping(obj: Mapping[str, Any], value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(obj, f"{path} must be a mapping, got {type(value).__name__}")
    return value


def _str_map(obj: Mapping[str, Any], value: Any, path: str) -> Mapping[str, str]:
    raw = _mapping(obj, value, path)
    for key, item in raw.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise _fail(obj, f"{path}.{key} must be a string")
    return MappingProxyType(dict(raw))


def _int(obj: Mapping[str, Any], value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(obj, f"{path} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _fail(obj, f"{path} must be between {low} and {high}, got {value}")
    return value


def metadata(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _mapping(obj, obj.get("metadata"), "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(obj, "metadata.name is required")
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str):
        raise _fail(obj, "metadata.namespace must be a string")
    return namespace, name


def pool_from_object(obj: Mapping[str, Any]) -> PoolSpec:
    namespace, name = metadata(obj)
    spec = _mapping(obj, obj.get("spec"), "spec")
    selector_field = _mapping(obj, spec.get("selector"), "spec.selector")
    # v1 nests labels under matchLabels; the older alpha API put them directly in selector.
    match_labels = selector_field.get("matchLabels", selector_field)
    selector = _str_map(obj, match_labels, "spec.selector.matchLabels")
    if not 1 <= len(selector) <= 64:
        raise _fail(obj, "spec.selector.matchLabels needs 1 to 64 labels")
    ports_field = spec.get("targetPorts")
    if ports_field is None and "targetPortNumber" in spec:  # v1alpha2 spelling
        ports_field = [{"number": spec["targetPortNumber"]}]
    if not isinstance(ports_field, list) or not 1 <= len(ports_field) <= 8:
        raise _fail(obj, "spec.targetPorts needs 1 to 8 entries")
    ports: list[int] = []
    for i, entry in enumerate(ports_field):
        number = _mapping(obj, entry, f"spec.targetPorts[{i}]").get("number")
        port = _int(obj, number, f"spec.targetPorts[{i}].number", 1, 65535)
        if port in ports:
            raise _fail(obj, f"spec.targetPorts[{i}].number {port} is listed twice")
        ports.append(port)
    app_protocol = spec.get("appProtocol") or "http"
    if app_protocol not in ("http", "kubernetes.io/h2c"):
        raise _fail(
            obj, f"spec.appProtocol must be 'http' or 'kubernetes.io/h2c', got {app_protocol!r}"
        )
    picker_ref = _mapping(obj, spec.get("endpointPickerRef"), "spec.endpointPickerRef")
    failure_mode = picker_ref.get("failureMode") or "FailClose"
    if failure_mode not in ("FailOpen", "FailClose"):
        raise _fail(
            obj,
            "spec.endpointPickerRef.failureMode must be FailOpen or FailClose, "
            f"got {failure_mode!r}",
        )
    return PoolSpec(
        name=name,
        namespace=namespace,
        selector=selector,
        target_ports=tuple(ports),
        app_protocol=app_protocol,
        failure_mode=failure_mode,
    )


def pod_is_routable(pod: Mapping[str, Any]) -> bool:
    """Ready, has an IP, and is not terminating."""
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    for condition in status.get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_labels(pod: Mapping[str, Any]) -> Mapping[str, str]:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    return labels if isinstance(labels, Mapping) else {}


def endpoints_from_pod(pod: Mapping[str, Any], pool: PoolSpec) -> list[Endpoint]:
    """One endpoint per target port (limited by the active-ports annotation), ranked in order."""
    namespace, name = metadata(pod)
    labels = _str_map(pod, pod_labels(pod), "metadata.labels")
    address = str((pod.get("status") or {}).get("podIP"))
    if not is_ip_address(address):
        raise _fail(pod, f"status.podIP {address!r} is not an IP address")
    ports = pool.target_ports
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    active = annotations.get(ACTIVE_PORTS_ANNOTATION) if isinstance(annotations, Mapping) else None
    if isinstance(active, str) and active.strip():
        wanted: set[int] = set()
        for part in active.split(","):
            part = part.strip()
            if not part.isdigit():
                raise _fail(
                    pod, f"annotation {ACTIVE_PORTS_ANNOTATION} has a non-numeric port {part!r}"
                )
            wanted.add(int(part))
        ports = tuple(p for p in ports if p in wanted)
    engine = labels.get(ENGINE_LABEL, DEFAULT_ENGINE)
    pod_annotations = (
        _str_map(pod, annotations, "metadata.annotations")
        if isinstance(annotations, Mapping)
        else {}
    )
    return [
        Endpoint(
            key=EndpointKey(f"{namespace}/{name}-rank-{rank}"),
            pod_name=name,
            namespace=namespace,
            address=address,
            port=port,
            rank=rank,
            labels=labels,
            engine=engine,
            annotations=pod_annotations,
        )
        for rank, port in enumerate(ports)
        if port in pool.target_ports
    ]


def _refers_to_pool(obj: Mapping[str, Any], spec: Mapping[str, Any], pool: PoolSpec | None) -> bool:
    ref = _mapping(obj, spec.get("poolRef"), "spec.poolRef")
    if pool is None or not ref:
        return True  # no pool to compare with, or an object that applies to every pool
    return ref.get("name") == pool.name


def objective_from_object(obj: Mapping[str, Any], pool: PoolSpec | None) -> Objective | None:
    namespace, name = metadata(obj)
    spec = _mapping(obj, obj.get("spec"), "spec")
    if not _refers_to_pool(obj, spec, pool):
        return None
    priority = spec.get("priority", 0)
    if priority is None:
        priority = 0
    return Objective(
        name=name,
        namespace=namespace,
        priority=_int(obj, priority, "spec.priority", -(2**31), 2**31 - 1),
    )


def rewrite_from_object(obj: Mapping[str, Any], pool: PoolSpec | None) -> ModelRewrite | None:
    namespace, name = metadata(obj)
    spec = _mapping(obj, obj.get("spec"), "spec")
    if not _refers_to_pool(obj, spec, pool):
        return None
    rules: list[RewriteRule] = []
    for i, rule in enumerate(spec.get("rules") or ()):
        rule = _mapping(obj, rule, f"spec.rules[{i}]")
        exact: list[str] = []
        for j, match in enumerate(rule.get("matches") or ()):
            model = _mapping(
                obj, _mapping(obj, match, f"spec.rules[{i}].matches[{j}]").get("model"), "model"
            )
            match_type = model.get("type", "Exact")
            value = model.get("value")
            if match_type != "Exact" or not isinstance(value, str) or not value:
                raise _fail(obj, f"spec.rules[{i}].matches[{j}].model needs type Exact and a value")
            exact.append(value)
        targets: list[RewriteTarget] = []
        for j, target in enumerate(rule.get("targets") or ()):
            target = _mapping(obj, target, f"spec.rules[{i}].targets[{j}]")
            model_name = target.get("modelRewrite")
            if not isinstance(model_name, str) or not model_name:
                raise _fail(obj, f"spec.rules[{i}].targets[{j}].modelRewrite is required")
            weight = _int(
                obj, target.get("weight", 1), f"spec.rules[{i}].targets[{j}].weight", 1, 1_000_000
            )
            targets.append(RewriteTarget(model=model_name, weight=weight))
        if not targets:
            raise _fail(obj, f"spec.rules[{i}].targets needs at least one target")
        rules.append(RewriteRule(exact_models=tuple(exact), targets=tuple(targets)))
    created = str((obj.get("metadata") or {}).get("creationTimestamp") or "")
    return ModelRewrite(name=name, namespace=namespace, created=created, rules=tuple(rules))


def workload_class_from_object(
    obj: Mapping[str, Any], pool: PoolSpec | None
) -> WorkloadClass | None:
    namespace, name = metadata(obj)
    spec = _mapping(obj, obj.get("spec"), "spec")
    if not _refers_to_pool(obj, spec, pool):
        return None
    workload_id = spec.get("workloadId") or name
    if not isinstance(workload_id, str):
        raise _fail(obj, "spec.workloadId must be a string")
    criticality = _int(obj, spec.get("criticality", 3), "spec.criticality", 1, 5)
    slo = _mapping(obj, spec.get("slo"), "spec.slo")
    limits = _mapping(obj, spec.get("limits"), "spec.limits")

    def optional_number(section: Mapping[str, Any], key: str, path: str) -> float | None:
        value = section.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise _fail(obj, f"{path}.{key} must be a positive number, got {value!r}")
        return float(value)

    def optional_int(section: Mapping[str, Any], key: str, path: str) -> int | None:
        value = section.get(key)
        return None if value is None else _int(obj, value, f"{path}.{key}", 1, 2**31 - 1)

    generation = (obj.get("metadata") or {}).get("generation") or 0
    return WorkloadClass(
        name=name,
        namespace=namespace,
        workload_id=workload_id,
        criticality=criticality,
        slo=SloTargets(
            ttft_ms=optional_number(slo, "ttftMilliseconds", "spec.slo"),
            tpot_ms=optional_number(slo, "tpotMilliseconds", "spec.slo"),
        ),
        limits=WorkloadLimits(
            max_concurrent_requests=optional_int(limits, "maxConcurrentRequests", "spec.limits"),
            requests_per_second=optional_number(limits, "requestsPerSecond", "spec.limits"),
            burst=optional_int(limits, "burst", "spec.limits"),
        ),
        generation=int(generation) if isinstance(generation, int) else 0,
    )
