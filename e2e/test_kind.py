"""End to end on a real cluster (kind): CRDs, the Helm chart, simulated model servers,
the operator's embedded picker behind its Envoy sidecar.

Skipped with the reason when kind, docker (with a running engine), kubectl or helm is
missing. Traffic goes through `kubectl port-forward` on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from e2e.kind_cluster import (
    IMAGE,
    REPO,
    KindCluster,
    eventually,
    kind_cluster,
    missing_prerequisites,
)

REASON = missing_prerequisites()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

NAMESPACE = "default"
RELEASE = "sluice"
SIM_PORT = 8000


def _simulators(replicas: int) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "sim", "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "sim"}},
            "template": {
                "metadata": {"labels": {"app": "sim"}},
                "spec": {
                    "containers": [{
                        "name": "sim",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["simulate", "--host", "0.0.0.0", "--port", str(SIM_PORT)],
                        "env": [{"name": "POD_NAME",
                                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"containerPort": SIM_PORT}],
                        "readinessProbe": {"httpGet": {"path": "/health", "port": SIM_PORT}},
                    }],
                },
            },
        },
    }  # fmt: skip


POOL = {
    "apiVersion": "inference.networking.k8s.io/v1",
    "kind": "InferencePool",
    "metadata": {"name": "sim-pool", "namespace": NAMESPACE},
    "spec": {
        "selector": {"matchLabels": {"app": "sim"}},
        "targetPorts": [{"number": SIM_PORT}],
        "endpointPickerRef": {"name": RELEASE, "port": {"number": 9002}},
    },
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _port_forward(cluster: KindCluster, target: str, port: int) -> Iterator[str]:
    local = _free_port()
    process = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE,
         "port-forward", "--address", "127.0.0.1", target, f"{local}:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{local}"
    finally:
        process.terminate()
        process.wait(10)


def _complete(base: str) -> tuple[int, str]:
    body = json.dumps({"model": "sim-model", "prompt": "hello", "max_tokens": 2}).encode()
    request = urllib.request.Request(
        f"{base}/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("x-inference-pod", "")
    except (urllib.error.URLError, ConnectionError) as error:
        return getattr(error, "code", 0), ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KindCluster]:
    with kind_cluster(tmp_path_factory.mktemp("kind")) as c:
        c.apply([_simulators(2), POOL])
        c.kubectl("rollout", "status", "deployment/sim", "--timeout=180s")
        c.helm(
            "install", RELEASE, str(REPO / "charts" / "sluice"), "--namespace", NAMESPACE,
            "--set", "pool.name=sim-pool", "--set", "image.repository=sluice",
            "--set", "image.tag=e2e", "--set", "image.pullPolicy=Never",
            "--set", "envoy.enabled=true", "--wait", "--timeout", "5m",
        )  # fmt: skip
        yield c


def _sim_pods(cluster: KindCluster) -> set[str]:
    pods = cluster.get("pods", "-n", NAMESPACE, "-l", "app=sim")["items"]
    return {p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")}


def test_requests_reach_the_pool_through_envoy_and_the_picker(cluster: KindCluster) -> None:
    with _port_forward(cluster, f"svc/{RELEASE}", 8081) as base:
        served = set()
        eventually(lambda: _complete(base)[0] == 200, "a first 200 through the gateway")
        for _ in range(20):
            status, pod = _complete(base)
            assert status == 200
            served.add(pod)
        assert served <= _sim_pods(cluster) and served


def test_scaled_up_pods_receive_traffic_and_deleted_ones_do_not(cluster: KindCluster) -> None:
    cluster.kubectl("scale", "deployment/sim", "--replicas=3")
    cluster.kubectl("rollout", "status", "deployment/sim", "--timeout=180s")
    with _port_forward(cluster, f"svc/{RELEASE}", 8081) as base:
        seen: set[str] = set()

        def all_pods_served() -> bool:
            for _ in range(10):
                status, pod = _complete(base)
                if status == 200:
                    seen.add(pod)
            return _sim_pods(cluster) <= seen

        eventually(all_pods_served, "every simulator pod to be served")
        victim = sorted(_sim_pods(cluster))[0]
        cluster.kubectl("delete", "pod", victim, "-n", NAMESPACE, "--wait=true")

        def victim_gone() -> bool:
            answers = [_complete(base) for _ in range(20)]
            return all(status == 200 and pod != victim for status, pod in answers)

        eventually(victim_gone, f"{victim} to stop receiving requests", timeout_s=30)


def test_bad_config_keeps_serving_and_posts_an_event(cluster: KindCluster) -> None:
    cluster.kubectl(
        "patch", "configmap", f"{RELEASE}-config", "-n", NAMESPACE, "--type", "merge",
        "-p", json.dumps({"data": {"config.yaml": "kind: EndpointPickerConfig\nplugins: 7\n"}}),
    )  # fmt: skip

    def rejected() -> bool:
        events = cluster.get(
            "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={RELEASE}-config"
        )
        return any(e.get("reason") == "ConfigRejected" for e in events["items"])

    eventually(rejected, "a ConfigRejected event on the ConfigMap")
    with _port_forward(cluster, f"svc/{RELEASE}", 8081) as base:
        eventually(lambda: _complete(base)[0] == 200, "requests still served")


def test_workload_class_gets_accepted_status(cluster: KindCluster) -> None:
    cluster.apply({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "WorkloadClass",
        "metadata": {"name": "fraud", "namespace": NAMESPACE},
        "spec": {"criticality": 5, "poolRef": {"name": "sim-pool"}},
    })  # fmt: skip

    def accepted() -> bool:
        status = cluster.get("workloadclass", "fraud", "-n", NAMESPACE).get("status") or {}
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or ()}
        return conditions.get("Accepted") == "True" and status.get("observedGeneration") == 1

    eventually(accepted, "WorkloadClass Accepted=True with observedGeneration 1")


def test_operator_never_wrote_pods_or_pools(cluster: KindCluster) -> None:
    pool = cluster.get("inferencepool", "sim-pool", "-n", NAMESPACE)
    assert not pool["metadata"].get("finalizers")
    assert not any(
        k.startswith("kopf.zalando.org") for k in pool["metadata"].get("annotations", {})
    )
    for pod in cluster.get("pods", "-n", NAMESPACE, "-l", "app=sim")["items"]:
        assert not pod["metadata"].get("finalizers")
        assert not any(
            k.startswith("kopf.zalando.org") for k in pod["metadata"].get("annotations", {})
        )
    # The RBAC role itself forbids it: can-i answers for the operator's service account.
    sa = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"
    for verb, resource in (("patch", "pods"), ("update", "inferencepools"), ("delete", "pods")):
        answer = subprocess.run(
            ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "auth", "can-i", verb,
             resource, "-n", NAMESPACE, "--as", sa], capture_output=True, text=True,
        )  # fmt: skip
        assert answer.stdout.strip() == "no", (verb, resource, answer.stdout)
