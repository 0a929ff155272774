"""Objects in, snapshots out: endpoint derivation, objectives, rewrites, workload classes."""

from __future__ import annotations

import copy

import pytest

from epp.datastore import kube_objects
from epp.datastore.reconciler import Reconciler
from epp.datastore.sources import SourceError, parse_endpoints


def pool(name: str = "pool", ports: tuple[int, ...] = (8000,), **labels: str) -> dict:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "selector": {"matchLabels": labels or {"app": "vllm"}},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    }


def pod(name: str, ip: str = "10.0.0.1", ready: bool = True, **extra: object) -> dict:
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "labels": {"app": "vllm"}},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
    for key, value in extra.items():
        obj["metadata"][key] = value  # type: ignore[index]
    return obj


def reconciler() -> Reconciler:
    return Reconciler(pool_name="pool", pool_namespace="ns")


def test_ready_pods_matching_the_selector_become_one_endpoint_per_port():
    r = reconciler()
    other = pod("other", "10.0.0.9")
    other["metadata"]["labels"] = {"app": "something-else"}
    r.replace(
        [
            pool(ports=(8000, 8001)),
            pod("a", "10.0.0.1"),
            pod("b", "10.0.0.2", ready=False),
            pod("c", "10.0.0.3", deletionTimestamp="2025-01-01T00:00:00Z"),
            other,
        ]
    )
    endpoints = r.current.endpoints
    assert [(e.key, e.target, e.rank) for e in endpoints] == [
        ("ns/a-rank-0", "10.0.0.1:8000", 0),
        ("ns/a-rank-1", "10.0.0.1:8001", 1),
    ]


def test_active_ports_annotation_limits_ports():
    r = reconciler()
    annotated = pod("a", annotations={"inference.networking.k8s.io/active-ports": "8001"})
    r.replace([pool(ports=(8000, 8001)), annotated])
    assert [e.target for e in r.current.endpoints] == ["10.0.0.1:8001"]


def test_pod_without_ip_or_in_other_namespace_is_skipped():
    r = reconciler()
    no_ip = pod("a")
    del no_ip["status"]["podIP"]
    elsewhere = pod("b", "10.0.0.2")
    elsewhere["metadata"]["namespace"] = "other"
    r.replace([pool(), no_ip, elsewhere])
    assert r.current.endpoints == ()


def test_ipv6_pods_are_bracketed():
    r = reconciler()
    r.replace([pool(), pod("a", "fd00::1")])
    assert r.current.endpoints[0].target == "[fd00::1]:8000"


def test_engine_label_selects_the_engine():
    r = reconciler()
    sg = pod("a")
    sg["metadata"]["labels"]["inference.networking.k8s.io/engine-type"] = "sglang"
    r.replace([pool(), sg])
    assert r.current.endpoints[0].engine == "sglang"


def test_watch_events_update_the_snapshot_and_notify():
    r = reconciler()
    seen = []
    r.subscribe(lambda s: seen.append(len(s.endpoints)))
    r.apply(pool())
    r.apply(pod("a"))
    r.apply(pod("b", "10.0.0.2"))
    unready = pod("a", ready=False)
    r.apply(unready)
    r.delete("Pod", "ns", "b")
    assert seen == [0, 1, 2, 1, 0]


def test_selector_change_re_evaluates_pods():
    r = reconciler()
    blue = pod("a")
    blue["metadata"]["labels"] = {"app": "vllm", "color": "blue"}
    r.replace([pool(app="vllm"), blue, pod("b", "10.0.0.2")])
    assert len(r.current.endpoints) == 2
    r.apply(pool(app="vllm", color="blue"))
    assert [e.pod_name for e in r.current.endpoints] == ["a"]


def test_snapshots_are_immutable_and_versioned():
    r = reconciler()
    r.apply(pool())
    first = r.current
    r.apply(pod("a"))
    assert first.endpoints == ()
    assert r.current.version > first.version


def test_objectives_give_priority_by_name():
    r = reconciler()
    objective = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferenceObjective",
        "metadata": {"name": "critical", "namespace": "ns"},
        "spec": {"priority": 10, "poolRef": {"name": "pool"}},
    }
    elsewhere = copy.deepcopy(objective)
    elsewhere["metadata"]["name"] = "other-pool"
    elsewhere["spec"]["poolRef"]["name"] = "different"
    r.replace([pool(), objective, elsewhere])
    assert r.current.objectives["critical"].priority == 10
    assert "other-pool" not in r.current.objectives


def rewrite(name: str, created: str, rules: list) -> dict:
    return {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferenceModelRewrite",
        "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created},
        "spec": {"poolRef": {"name": "pool"}, "rules": rules},
    }


def test_rewrites_exact_beats_catch_all_and_oldest_wins():
    r = reconciler()
    newer = rewrite(
        "newer",
        "2025-02-01T00:00:00Z",
        [
            {
                "matches": [{"model": {"type": "Exact", "value": "llama"}}],
                "targets": [{"modelRewrite": "new"}],
            },
            {"targets": [{"modelRewrite": "catch-all"}]},
        ],
    )
    older = rewrite(
        "older",
        "2025-01-01T00:00:00Z",
        [
            {
                "matches": [{"model": {"value": "llama"}}],
                "targets": [{"modelRewrite": "old", "weight": 5}],
            }
        ],
    )
    r.replace([pool(), newer, older])
    snapshot = r.current
    assert [t.model for t in snapshot.rewrite_targets("llama")] == ["old"]
    assert [t.model for t in snapshot.rewrite_targets("anything")] == ["catch-all"]


def test_workload_class_values():
    r = reconciler()
    wc = {
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "WorkloadClass",
        "metadata": {"name": "fraud", "namespace": "ns", "generation": 3},
        "spec": {"criticality": 5, "slo": {"ttftMilliseconds": 200}, "limits": {"burst": 10}},
    }
    r.replace([pool(), wc])
    cls = r.current.workload_classes["fraud"]
    assert (cls.criticality, cls.slo.ttft_ms, cls.limits.burst, cls.generation) == (5, 200.0, 10, 3)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p["spec"].update(targetPorts=[]), "spec.targetPorts needs 1 to 8 entries"),
        (lambda p: p["spec"].update(targetPorts=[{"number": 0}]), "between 1 and 65535"),
        (lambda p: p["spec"].update(targetPorts=[{"number": 80}, {"number": 80}]), "listed twice"),
        (lambda p: p["spec"].update(selector={"matchLabels": {}}), "1 to 64 labels"),
        (lambda p: p["spec"].update(appProtocol="grpc"), "spec.appProtocol"),
    ],
)
def test_invalid_pools_are_named_precisely(mutate, message):
    obj = pool()
    mutate(obj)
    with pytest.raises(kube_objects.ObjectError, match=message) as info:
        kube_objects.pool_from_object(obj)
    assert "InferencePool ns/pool" in str(info.value)


def test_invalid_pool_means_no_pool_not_a_crash():
    r = reconciler()
    broken = pool()
    broken["spec"]["targetPorts"] = "8000"
    r.replace([broken, pod("a")])
    assert r.current.pool is None and r.current.endpoints == ()


def test_unsupported_kind_is_rejected():
    with pytest.raises(kube_objects.ObjectError, match="unsupported kind 'Service'"):
        reconciler().apply({"kind": "Service", "metadata": {"name": "x"}})


def test_static_endpoints():
    endpoints = parse_endpoints("127.0.0.1:8000, [::1]:8001")
    assert [e.target for e in endpoints] == ["127.0.0.1:8000", "[::1]:8001"]
    r = Reconciler(static_endpoints=endpoints)
    assert len(r.current.endpoints) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost:8000", "not an IP address"),
        ("127.0.0.1", "is not ip:port"),
        ("127.0.0.1:99999", "is not ip:port"),
        ("127.0.0.1:80,127.0.0.1:80", "listed twice"),
    ],
)
def test_bad_static_endpoints(text, message):
    with pytest.raises(SourceError, match=message):
        parse_endpoints(text)
