"""The CRDs accept what the upstream v1/v1alpha2 APIs accept, and the picker reads it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from epp.datastore import kube_objects
from tests.operator.schema import crd_schema, violations


def _pool(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "vllm-llama3-8b-instruct"}},
        "targetPorts": [{"number": 8000}],
    }
    base.update(spec)
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "vllm-llama3-8b-instruct", "namespace": "default"},
        "spec": base,
    }


VALID_POOLS = {
    "minimal, no picker reference": _pool(),
    "picker service with port": _pool(endpointPickerRef={"name": "epp", "port": {"number": 9002}}),
    "every field": _pool(
        appProtocol="kubernetes.io/h2c",
        targetPorts=[{"number": p} for p in range(8000, 8008)],
        endpointPickerRef={
            "group": "",
            "kind": "Service",
            "name": "epp",
            "port": {"number": 9002},
            "failureMode": "FailOpen",
        },
    ),
    "non-Service picker without port": _pool(
        endpointPickerRef={"group": "example.com", "kind": "Backend", "name": "epp"}
    ),
    "empty label value": _pool(selector={"matchLabels": {"app": ""}}),
}

INVALID_POOLS = {
    "no target ports": (_pool(targetPorts=[]), "spec.targetPorts: fewer than 1 items"),
    "nine ports": (
        _pool(targetPorts=[{"number": p} for p in range(8000, 8009)]),
        "spec.targetPorts: more than 8 items",
    ),
    "port zero": (_pool(targetPorts=[{"number": 0}]), "spec.targetPorts[0].number: 0 below"),
    "empty selector": (
        _pool(selector={"matchLabels": {}}),
        "spec.selector.matchLabels: fewer than 1 properties",
    ),
    "unknown protocol": (_pool(appProtocol="https"), "spec.appProtocol: 'https' not in"),
    "unknown failure mode": (
        _pool(endpointPickerRef={"name": "e", "port": {"number": 1}, "failureMode": "Retry"}),
        "spec.endpointPickerRef.failureMode",
    ),
}


@pytest.mark.parametrize("name", VALID_POOLS)
def test_valid_upstream_pools_pass_the_crd_and_the_picker(name: str) -> None:
    _, schema = crd_schema("InferencePool")
    pool = VALID_POOLS[name]
    assert violations(schema, pool) == []
    spec = kube_objects.pool_from_object(pool)
    assert spec.target_ports[0] == 8000


@pytest.mark.parametrize("name", INVALID_POOLS)
def test_invalid_pools_are_rejected_with_the_field(name: str) -> None:
    _, schema = crd_schema("InferencePool")
    pool, expected = INVALID_POOLS[name]
    found = violations(schema, pool)
    assert any(expected in v for v in found), found


def test_pool_crd_identity_and_rules() -> None:
    crd, schema = crd_schema("InferencePool")
    assert crd["spec"]["group"] == "inference.networking.k8s.io"
    assert crd["spec"]["names"]["shortNames"] == ["infpool"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1" and version["subresources"] == {"status": {}}
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["selector", "targetPorts"]
    rules = [r["rule"] for r in spec["properties"]["targetPorts"]["x-kubernetes-validations"]]
    assert any("exists_one" in r for r in rules)  # unique port numbers
    ref = spec["properties"]["endpointPickerRef"]
    assert ref["properties"]["failureMode"]["default"] == "FailClose"
    status = {
        "parents": [
            {
                "parentRef": {"name": "gw"},
                "controllerName": "example.com/gw",
                "conditions": [
                    {
                        "type": "Accepted",
                        "status": "True",
                        "reason": "Accepted",
                        "message": "",
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    }
                ],
            }
        ]
    }
    assert violations(schema, {**_pool(), "status": status}) == []


def test_objective_and_rewrite_crds() -> None:
    crd, schema = crd_schema("InferenceObjective")
    assert (crd["spec"]["group"], crd["spec"]["versions"][0]["name"]) == (
        "inference.networking.x-k8s.io",
        "v1alpha2",
    )
    objective = {"spec": {"priority": -10, "poolRef": {"name": "pool"}}}
    assert violations(schema, objective) == []
    assert violations(schema, {"spec": {"priority": 1}}) == ["spec: poolRef is required"]

    _, schema = crd_schema("InferenceModelRewrite")
    rewrite = {
        "spec": {
            "poolRef": {"name": "pool"},
            "rules": [
                {
                    "matches": [{"model": {"value": "llama"}}],
                    "targets": [
                        {"modelRewrite": "llama-v2", "weight": 90},
                        {"modelRewrite": "llama-v3", "weight": 10},
                    ],
                },
                {"targets": [{"modelRewrite": "fallback"}]},
            ],
        }
    }
    assert violations(schema, rewrite) == []
    heavy = copy.deepcopy(rewrite)
    heavy["spec"]["rules"][0]["targets"][0]["weight"] = 1_000_001
    assert any("above maximum 1000000" in v for v in violations(schema, heavy))


def test_workload_class_crd() -> None:
    crd, schema = crd_schema("WorkloadClass")
    assert (crd["spec"]["group"], crd["spec"]["versions"][0]["name"]) == (
        "sluice.dev",
        "v1alpha1",
    )
    assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}
    wc = {
        "spec": {
            "workloadId": "fraud",
            "criticality": 5,
            "slo": {"ttftMilliseconds": 200, "tpotMilliseconds": 30.5},
            "limits": {"maxConcurrentRequests": 64, "requestsPerSecond": 20, "burst": 40},
            "poolRef": {"name": "pool"},
        },
        "status": {"observedGeneration": 3, "conditions": []},
    }
    assert violations(schema, wc) == []
    kube_objects.workload_class_from_object(
        {"kind": "WorkloadClass", "metadata": {"name": "w"}, **wc}, None
    )
    assert any("above maximum 5" in v for v in violations(schema, {"spec": {"criticality": 6}}))
    assert any(
        "below minimum 0" in v
        for v in violations(schema, {"spec": {"slo": {"ttftMilliseconds": 0}}})
    )
