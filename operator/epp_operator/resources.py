"""The Kubernetes resources the operator watches, and how their objects reach the picker.

Watch events arrive as kopf bodies; the reconciler takes plain dicts shaped as the API
returns them. Pods are slimmed to the fields the picker reads (metadata and status), so a
large namespace does not keep every container spec in memory twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


POD = Resource("Pod", "", "v1", "pods")
POOL = Resource("InferencePool", "inference.networking.k8s.io", "v1", "inferencepools")
OBJECTIVE = Resource(
    "InferenceObjective", "inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives"
)
REWRITE = Resource(
    "InferenceModelRewrite", "inference.networking.x-k8s.io", "v1alpha2", "inferencemodelrewrites"
)
WORKLOAD_CLASS = Resource("WorkloadClass", "sluice.dev", "v1alpha1", "workloadclasses")
CONFIG_MAP = Resource("ConfigMap", "", "v1", "configmaps")

# Every kind that becomes a datastore input, in the order the reconciler documents them.
FED: tuple[Resource, ...] = (POD, POOL, OBJECTIVE, REWRITE, WORKLOAD_CLASS)

_POD_METADATA = (
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "creationTimestamp",
    "deletionTimestamp",
)


def plain(value: Any) -> Any:
    """A deep copy made of dicts and lists (kopf hands out read-only mapping views)."""
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def to_object(resource: Resource, body: Mapping[str, Any]) -> dict[str, Any]:
    """The object as the reconciler takes it; list items may lack kind/apiVersion."""
    if resource is POD:
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        obj: dict[str, Any] = {
            "metadata": {key: plain(meta[key]) for key in _POD_METADATA if key in meta},
            "status": {
                "podIP": status.get("podIP"),
                "conditions": plain(status.get("conditions") or []),
            },
        }
    else:
        obj = plain(body)
    obj["kind"] = resource.kind
    obj["apiVersion"] = resource.api_version
    return obj
