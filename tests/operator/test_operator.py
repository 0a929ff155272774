"""The operator end to end: emulated API server → kopf → reconciler → picker → gRPC."""

from __future__ import annotations

import logging

import pytest

from tests.operator.cluster import Cluster, emulated_cluster
from tests.operator.harness import (
    NAMESPACE,
    endpoint_addresses,
    pod,
    pool,
    ready_condition,
    route,
    running_operator,
    until,
)
from tests.operator.model_servers import model_servers
from tests.support.extproc_client import ExtProcClient

DESTINATION = "x-gateway-destination-endpoint"


@pytest.fixture
async def cluster():
    async with emulated_cluster() as c:
        yield c


async def test_pool_and_pods_route_to_pod_ips(cluster: Cluster) -> None:
    async with model_servers(["127.0.0.2", "127.0.0.3"]) as servers:
        port = servers[0].port
        await cluster.create(pool(port))
        await cluster.create(pod("a", "127.0.0.2"))
        await cluster.create(pod("b", "127.0.0.3"))
        await cluster.create(pod("other", "127.0.0.4", labels={"app": "web"}))
        async with running_operator(cluster) as runtime:
            await until(lambda: runtime.reconciler.current.synced, "initial sync")
            assert endpoint_addresses(runtime) == {"127.0.0.2", "127.0.0.3"}
            client = ExtProcClient(runtime.picker.grpc_port)
            try:
                seen = {(await route(client))[DESTINATION] for _ in range(10)}
            finally:
                await client.close()
            assert seen <= {f"127.0.0.2:{port}", f"127.0.0.3:{port}"} and seen


async def test_readiness_waits_for_the_pool(cluster: Cluster) -> None:
    await cluster.create(pod("a", "127.0.0.2"))
    async with running_operator(cluster) as runtime:
        assert not runtime.reconciler.current.synced
        await cluster.create(pool(8000))
        await until(lambda: runtime.reconciler.current.synced, "sync after the pool appears")
        assert endpoint_addresses(runtime) == {"127.0.0.2"}


async def test_unready_pod_gets_nothing_new(cluster: Cluster) -> None:
    async with model_servers(["127.0.0.2", "127.0.0.3"]) as servers:
        port = servers[0].port
        await cluster.create(pool(port))
        await cluster.create(pod("a", "127.0.0.2"))
        await cluster.create(pod("b", "127.0.0.3"))
        async with running_operator(cluster) as runtime:
            await until(lambda: len(endpoint_addresses(runtime)) == 2, "both pods")
            await cluster.patch(
                "Pod", NAMESPACE, "a", {"status": {"conditions": [ready_condition(False)]}}
            )
            await until(lambda: endpoint_addresses(runtime) == {"127.0.0.3"}, "a unready")
            client = ExtProcClient(runtime.picker.grpc_port)
            try:
                seen = {(await route(client))[DESTINATION] for _ in range(10)}
            finally:
                await client.close()
            assert seen == {f"127.0.0.3:{port}"}
            await cluster.delete("Pod", NAMESPACE, "b")
            await until(lambda: not endpoint_addresses(runtime), "b deleted")


async def test_pool_selector_change_reevaluates_pods(cluster: Cluster) -> None:
    await cluster.create(pool(8000))
    await cluster.create(pod("a", "127.0.0.2"))
    await cluster.create(pod("b", "127.0.0.3", labels={"app": "vllm-canary"}))
    async with running_operator(cluster) as runtime:
        await until(lambda: endpoint_addresses(runtime) == {"127.0.0.2"}, "a selected")
        await cluster.patch(
            "InferencePool",
            NAMESPACE,
            "llm",
            {"spec": {"selector": {"matchLabels": {"app": "vllm-canary"}}}},
        )
        await until(lambda: endpoint_addresses(runtime) == {"127.0.0.3"}, "b selected")


async def test_objective_rewrite_and_workload_class_take_effect(cluster: Cluster) -> None:
    await cluster.create(pool(8000))
    async with running_operator(cluster) as runtime:
        await until(lambda: runtime.reconciler.current.synced, "initial sync")
        await cluster.create(
            {
                "kind": "InferenceObjective",
                "metadata": {"name": "critical", "namespace": NAMESPACE},
                "spec": {"priority": 10, "poolRef": {"name": "llm"}},
            }
        )
        await cluster.create(
            {
                "kind": "InferenceModelRewrite",
                "metadata": {"name": "canary", "namespace": NAMESPACE},
                "spec": {
                    "poolRef": {"name": "llm"},
                    "rules": [
                        {
                            "matches": [{"model": {"type": "Exact", "value": "m"}}],
                            "targets": [{"modelRewrite": "m-v2", "weight": 1}],
                        }
                    ],
                },
            }
        )
        await cluster.create(
            {
                "kind": "WorkloadClass",
                "metadata": {"name": "fraud", "namespace": NAMESPACE},
                "spec": {"criticality": 5, "poolRef": {"name": "llm"}},
            }
        )
        snap = lambda: runtime.reconciler.current  # noqa: E731
        await until(lambda: "critical" in snap().objectives, "objective")
        assert snap().objectives["critical"].priority == 10
        await until(lambda: "m" in snap().rewrites_exact, "rewrite")
        assert [t.model for t in snap().rewrites_exact["m"]] == ["m-v2"]
        await until(lambda: "fraud" in snap().workload_classes, "workload class")
        assert snap().workload_classes["fraud"].criticality == 5

        await cluster.patch("InferenceObjective", NAMESPACE, "critical", {"spec": {"priority": 1}})
        await until(lambda: snap().objectives["critical"].priority == 1, "objective change")
        await cluster.delete("InferenceModelRewrite", NAMESPACE, "canary")
        await until(lambda: "m" not in snap().rewrites_exact, "rewrite deleted")
        await cluster.patch("WorkloadClass", NAMESPACE, "fraud", {"spec": {"criticality": 2}})
        await until(lambda: snap().workload_classes["fraud"].criticality == 2, "class change")


def _accepted(obj: dict) -> dict | None:
    status = obj.get("status") or {}
    return next((c for c in status.get("conditions") or () if c["type"] == "Accepted"), None)


async def test_workload_class_status(cluster: Cluster) -> None:
    await cluster.create(pool(8000))
    await cluster.create(
        {
            "kind": "WorkloadClass",
            "metadata": {"name": "fraud", "namespace": NAMESPACE},
            "spec": {"criticality": 4},
        }
    )
    await cluster.create(
        {
            "kind": "WorkloadClass",
            "metadata": {"name": "elsewhere", "namespace": NAMESPACE},
            "spec": {"criticality": 4, "poolRef": {"name": "another-pool"}},
        }
    )
    async with running_operator(cluster):
        get = lambda: cluster.get("WorkloadClass", NAMESPACE, "fraud")  # noqa: E731
        await until(lambda: _accepted(get()) is not None, "Accepted condition")
        condition = _accepted(get())
        assert condition is not None
        assert (condition["status"], condition["reason"]) == ("True", "Accepted")
        assert get()["status"]["observedGeneration"] == 1

        await cluster.patch("WorkloadClass", NAMESPACE, "fraud", {"spec": {"criticality": 9}})
        await until(lambda: get()["status"]["observedGeneration"] == 2, "generation 2")
        condition = _accepted(get())
        assert condition is not None
        assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
        assert "spec.criticality must be between 1 and 5, got 9" in condition["message"]
        # A class of another pool belongs to that pool's operator.
        assert "status" not in cluster.get("WorkloadClass", NAMESPACE, "elsewhere")


async def test_api_server_outage(cluster: Cluster) -> None:
    async with model_servers(["127.0.0.2", "127.0.0.3", "127.0.0.4"]) as servers:
        port = servers[0].port
        await cluster.create(pool(port))
        await cluster.create(pod("a", "127.0.0.2"))
        await cluster.create(pod("c", "127.0.0.4"))
        async with running_operator(cluster, resync_period_s=0) as runtime:
            await until(lambda: len(endpoint_addresses(runtime)) == 2, "initial sync")
            await cluster.gate.close()
            client = ExtProcClient(runtime.picker.grpc_port)
            try:
                # Changes while the operator cannot see the API server.
                await cluster.create(pod("b", "127.0.0.3"))
                await cluster.patch(
                    "Pod", NAMESPACE, "a", {"status": {"conditions": [ready_condition(False)]}}
                )
                await cluster.delete("Pod", NAMESPACE, "c")
                before = {f"127.0.0.2:{port}", f"127.0.0.4:{port}"}
                for _ in range(5):
                    assert (await route(client))[DESTINATION] in before
                await cluster.gate.open()
                await until(
                    lambda: endpoint_addresses(runtime) == {"127.0.0.3"},
                    "changes made during the outage, the deletion included",
                    timeout_s=30.0,
                )
                assert (await route(client))[DESTINATION] == f"127.0.0.3:{port}"
            finally:
                await client.close()


async def test_operator_never_writes_pods_or_pools(cluster: Cluster) -> None:
    await cluster.create(pool(8000))
    await cluster.create(pod("a", "127.0.0.2"))
    await cluster.create(
        {"kind": "WorkloadClass", "metadata": {"name": "w", "namespace": NAMESPACE}, "spec": {}}
    )
    async with running_operator(cluster) as runtime:
        await until(lambda: runtime.reconciler.current.synced, "initial sync")
        await cluster.patch(
            "Pod", NAMESPACE, "a", {"metadata": {"labels": {"app": "vllm", "x": "1"}}}
        )
        await cluster.patch(
            "InferencePool", NAMESPACE, "llm", {"spec": {"targetPorts": [{"number": 8001}]}}
        )
        await until(
            lambda: {e.port for e in runtime.reconciler.current.endpoints} == {8001}, "new port"
        )
        await until(
            lambda: _accepted(cluster.get("WorkloadClass", NAMESPACE, "w")) is not None,
            "status written",
        )
    writes = cluster.operator_writes()
    touched = {(str(r.resource.plural) if r.resource else "?", r.subresource) for r in writes}
    assert touched == {("workloadclasses", "status")}, touched


CONFIG_HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
GOOD_CONFIG = CONFIG_HEADER + (
    "plugins:\n- {type: queue-scorer}\n- {type: max-score-picker}\n"
    "schedulingProfiles:\n- name: default\n  plugins:\n"
    "  - {pluginRef: queue-scorer}\n  - {pluginRef: max-score-picker}\n"
)
OTHER_CONFIG = CONFIG_HEADER + (
    "plugins:\n- {type: kv-cache-utilization-scorer}\n- {type: max-score-picker}\n"
    "schedulingProfiles:\n- name: default\n  plugins:\n"
    "  - {pluginRef: kv-cache-utilization-scorer}\n  - {pluginRef: max-score-picker}\n"
)


def _config_map(text: str) -> dict:
    return {
        "kind": "ConfigMap",
        "metadata": {"name": "sluice-config", "namespace": NAMESPACE},
        "data": {"config.yaml": text},
    }


def _events(cluster: Cluster, reason: str) -> list[dict]:
    return [e for e in cluster.events() if e.get("reason") == reason]


async def test_configmap_hot_reload_and_bad_config(cluster: Cluster) -> None:
    await cluster.create(pool(8000))
    await cluster.create(_config_map(GOOD_CONFIG))
    async with running_operator(cluster, config_configmap="sluice-config") as runtime:
        await until(lambda: runtime.reconciler.current.synced, "pool + config synced")
        picker = runtime.picker
        assert {"queue-scorer", "max-score-picker"} <= set(picker.config.plugins)
        assert "kv-cache-utilization-scorer" not in picker.config.plugins

        await cluster.patch("ConfigMap", NAMESPACE, "sluice-config", _config_map(OTHER_CONFIG))
        await until(lambda: "kv-cache-utilization-scorer" in picker.config.plugins, "reload")
        good = picker.config

        bad = CONFIG_HEADER + "plugins:\n- {type: no-such-scorer}\n"
        await cluster.patch("ConfigMap", NAMESPACE, "sluice-config", _config_map(bad))
        await until(lambda: bool(_events(cluster, "ConfigRejected")), "a Warning Event")
        event = _events(cluster, "ConfigRejected")[0]
        assert event["type"] == "Warning"
        assert event["involvedObject"]["name"] == "sluice-config"
        assert event["involvedObject"]["kind"] == "ConfigMap"
        assert "no-such-scorer" in event["message"]
        assert "previous config stays in force" in event["message"]
        assert picker.config is good
        assert _events(cluster, "ConfigApplied")


async def test_readiness_waits_for_a_valid_configmap(cluster: Cluster) -> None:
    await cluster.create(pool(8000))
    await cluster.create(_config_map(CONFIG_HEADER + "plugins: 7\n"))
    async with running_operator(cluster, config_configmap="sluice-config") as runtime:
        await until(lambda: bool(_events(cluster, "ConfigRejected")), "a Warning Event")
        assert not runtime.reconciler.current.synced
        await cluster.patch("ConfigMap", NAMESPACE, "sluice-config", _config_map(GOOD_CONFIG))
        await until(lambda: runtime.reconciler.current.synced, "synced once the config is valid")


async def test_clusterwide_watches_every_namespace_but_pods_of_the_pool_only(
    cluster: Cluster,
) -> None:
    await cluster.create(pool(8000))
    await cluster.create(pod("a", "127.0.0.2"))
    stray = pod("stray", "127.0.0.3")
    stray["metadata"]["namespace"] = "other"
    await cluster.create(stray)
    await cluster.create(
        {
            "kind": "WorkloadClass",
            "metadata": {"name": "tenant", "namespace": "other"},
            "spec": {"criticality": 2, "poolRef": {"name": "llm"}},
        }
    )
    async with running_operator(cluster, clusterwide=True) as runtime:
        # Watches of different kinds deliver in no particular order: wait for both.
        await until(lambda: "tenant" in runtime.reconciler.current.workload_classes, "class")
        await until(lambda: endpoint_addresses(runtime) == {"127.0.0.2"}, "the pool's pod")
        assert [o["metadata"]["name"] for o in runtime.feed.objects("Pod")] == ["a"]


async def test_event_level_error_posts_no_warning_events(cluster: Cluster) -> None:
    from epp import metrics

    def failures() -> float:
        sample = metrics.REGISTRY.get_sample_value("config_reload_total", {"result": "failure"})
        return sample or 0.0

    await cluster.create(pool(8000))
    await cluster.create(_config_map(GOOD_CONFIG))
    async with running_operator(
        cluster, config_configmap="sluice-config", event_level=logging.ERROR
    ) as runtime:
        await until(lambda: runtime.reconciler.current.synced, "synced")
        before = failures()
        bad = CONFIG_HEADER + "plugins:\n- {type: no-such-scorer}\n"
        await cluster.patch("ConfigMap", NAMESPACE, "sluice-config", _config_map(bad))
        await until(lambda: failures() > before, "the rejected reload")
    assert not _events(cluster, "ConfigRejected") and not _events(cluster, "ConfigApplied")
