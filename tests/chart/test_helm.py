"""The chart through the real helm: lint, render, schema, and every rendered object checked
against the Kubernetes API's own schemas (kubernetes-validate, strict: unknown fields fail)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import CHART, Helm

KUBERNETES = "1.31.0"  # the oldest Kubernetes the chart's objects must fit
POOL = ("--set", "pool.name=llama-pool")
DEFAULT_KINDS = {"ServiceAccount", "ConfigMap", "Role", "RoleBinding", "Service", "Deployment"}


def validate(objects: list[dict[str, Any]]) -> None:
    """Every object against its Kubernetes schema; CRD kinds are not in those schemas."""
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            raise AssertionError(f"{name}: {error.message} at {list(error.path)}") from None


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize("values", [(), POOL], ids=["chart-values", "pool-set"])
def test_helm_lint_passes(helm: Helm, strict: bool, values: tuple[str, ...]) -> None:
    result = helm.run("lint", str(CHART), *values, *(["--strict"] if strict else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_helm_lint_passes_with_every_option_on(helm: Helm) -> None:
    result = helm.run(
        "lint", str(CHART), "--strict", *POOL, "--set", "replicas=3",
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.grafanaDashboard.enabled=true", "--set", "envoy.enabled=true",
        "--set", "configPreset=slo-aware", "--set", "clusterwide=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


PRESETS = sorted(p.stem.removeprefix("config-") for p in (CHART / "files").glob("config-*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_is_accepted_and_rendered_as_shipped(helm: Helm, preset: str) -> None:
    objects = helm.template(*POOL, "--set", f"configPreset={preset}")
    [config] = [o for o in objects if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]]
    shipped = (CHART / "files" / f"config-{preset}.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(config["data"]["config.yaml"]) == yaml.safe_load(shipped)


def test_default_values_render_valid_objects_without_the_optional_ones(helm: Helm) -> None:
    objects = helm.template(*POOL)
    assert {obj["kind"] for obj in objects} == DEFAULT_KINDS
    validate(objects)


def test_the_validation_is_strict(helm: Helm) -> None:
    """A field Kubernetes does not know, or a wrong type, fails the check (it is not vacuous)."""
    (deployment,) = by_kind(helm.template(*POOL), "Deployment")
    with pytest.raises(AssertionError, match="replicaz"):
        validate([{**deployment, "spec": {**deployment["spec"], "replicaz": 2}}])
    with pytest.raises(AssertionError, match="Deployment/sluice"):
        validate([{**deployment, "spec": {**deployment["spec"], "replicas": "two"}}])


def test_the_pool_name_is_required(helm: Helm) -> None:
    result = helm.run("template", "sluice", str(CHART))
    assert result.returncode != 0
    assert "pool.name is required" in result.stderr


@pytest.mark.parametrize(
    ("replicas", "min_available", "rendered"), [(2, None, 1), (3, "2", 2), (4, "50%", "50%")]
)
def test_two_or_more_replicas_get_a_disruption_budget(
    helm: Helm, replicas: int, min_available: str | None, rendered: int | str
) -> None:
    chosen = () if min_available is None else (f"podDisruptionBudget.minAvailable={min_available}",)
    extra = [arg for value in chosen for arg in ("--set", value)]
    objects = helm.template(*POOL, "--set", f"replicas={replicas}", *extra)
    validate(objects)
    (budget,) = by_kind(objects, "PodDisruptionBudget")
    (deployment,) = by_kind(objects, "Deployment")
    assert budget["spec"]["minAvailable"] == rendered
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["metadata"]["namespace"] == deployment["metadata"]["namespace"]


def test_one_replica_gets_no_budget_and_an_impossible_budget_is_refused(helm: Helm) -> None:
    assert by_kind(helm.template(*POOL, "--set", "replicas=1"), "PodDisruptionBudget") == []
    result = helm.run(
        "template", "sluice", str(CHART), *POOL,
        "--set", "replicas=2", "--set", "podDisruptionBudget.minAvailable=2",
    )  # fmt: skip
    assert result.returncode != 0
    assert "podDisruptionBudget.minAvailable (2) must be below replicas (2)" in result.stderr


def test_service_monitor_scrapes_the_metrics_port_of_the_service(helm: Helm) -> None:
    objects = helm.template(
        *POOL, "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.serviceMonitor.interval=15s",
        "--set", "metrics.serviceMonitor.labels.release=kube-prometheus-stack",
    )  # fmt: skip
    validate(objects)
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (service,) = by_kind(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    metrics_port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
    assert metrics_port["port"] == 9090
    assert endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "10s")
    assert set(monitor["spec"]) == {"selector", "endpoints"}


def test_grafana_dashboard_configmap_carries_the_dashboard_and_the_sidecar_label(
    helm: Helm,
) -> None:
    objects = helm.template(
        *POOL, "--set", "metrics.grafanaDashboard.enabled=true",
        "--set", "metrics.grafanaDashboard.namespace=monitoring",
        "--set", "metrics.grafanaDashboard.annotations.grafana_folder=Sluice",
    )  # fmt: skip
    validate(objects)
    (dashboard,) = [c for c in by_kind(objects, "ConfigMap") if "sluice.json" in c["data"]]
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Sluice"}
    shipped = json.loads((CHART / "dashboards" / "sluice.json").read_text(encoding="utf-8"))
    assert json.loads(dashboard["data"]["sluice.json"]) == shipped


def test_every_option_on_renders_valid_objects(helm: Helm) -> None:
    objects = helm.template(
        *POOL, "--set", "replicas=2", "--set", "envoy.enabled=true",
        "--set", "picker.certSecret=picker-tls", "--set", "clusterwide=true",
        "--set", "metrics.serviceMonitor.enabled=true",
        "--set", "metrics.grafanaDashboard.enabled=true",
    )  # fmt: skip
    validate(objects)
    assert {obj["kind"] for obj in objects} >= {
        "ClusterRole", "ClusterRoleBinding", "PodDisruptionBudget", "ServiceMonitor",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicas": -1}, "/replicas"),
        ({"replicas": "two"}, "/replicas"),
        ({"picker": {"grpcPort": 70000}}, "/picker/grpcPort"),
        ({"picker": {"refreshMetricsInterval": "fast"}}, "/picker/refreshMetricsInterval"),
        ({"picker": {"responseSampleRate": 2}}, "/picker/responseSampleRate"),
        ({"operator": {"eventLevel": "debug"}}, "/operator/eventLevel"),
        ({"service": {"type": "Internal"}}, "/service/type"),
        ({"envoy": {"failureMode": "FailSafe"}}, "/envoy/failureMode"),
        ({"configPreset": "fastest"}, "/configPreset"),
        ({"podDisruptionBudget": {"minAvailable": "half"}}, "/podDisruptionBudget/minAvailable"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
        ({"metrics": {"serviceMonitor": {"interval": "1.5s"}}}, "/metrics/serviceMonitor/interval"),
        ({"pool": {"name": "Llama_Pool"}}, "/pool/name"),
        ({"replica": 2}, "replica"),  # a typo of a key the chart owns
        ({"picker": {"grpcport": 9002}}, "grpcport"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_values_breaking_the_schema_are_rejected_by_helm(
    helm: Helm, tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump({"pool": {"name": "llama-pool"}} | values))
    result = helm.run("template", "sluice", str(CHART), "--values", str(values_file))
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr, result.stderr
