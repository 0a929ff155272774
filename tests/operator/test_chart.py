"""Static checks of the Helm chart (tests/chart/ runs the real helm on it)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "sluice"


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))


def test_every_value_a_template_reads_exists() -> None:
    values = _values()
    missing = []
    for template in sorted((CHART / "templates").glob("*")):
        for path in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()):
            node: Any = values
            for part in path.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{template.name}: .Values.{path}")
                    break
                node = node[part]
    assert missing == []


def test_rbac_reads_the_cluster_and_writes_only_what_the_operator_owns() -> None:
    text = (CHART / "templates" / "rbac.yaml").read_text(encoding="utf-8")
    rules_block = text.split("rules:\n", 1)[1].split("\n---", 1)[0]
    rules = yaml.safe_load(re.sub(r"\{\{.*?\}\}", "x", "rules:\n" + rules_block))["rules"]
    writes = {
        (group, resource)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        if set(rule["verbs"]) - {"get", "list", "watch"}
    }
    assert writes == {
        ("sluice.dev", "workloadclasses/status"),
        ("", "events"),
        ("events.k8s.io", "events"),
    }
    reads = {r for rule in rules for r in rule["resources"]}
    assert {
        "pods",
        "inferencepools",
        "inferenceobjectives",
        "inferencemodelrewrites",
        "workloadclasses",
        "configmaps",
    } <= reads
    assert "'Role'" not in text and 'ternary "ClusterRole" "Role" .Values.clusterwide' in text


def test_containers_run_as_non_root_with_a_read_only_root() -> None:
    text = (CHART / "templates" / "deployment.yaml").read_text(encoding="utf-8")
    assert "runAsNonRoot: true" in text
    assert text.count("readOnlyRootFilesystem: true") == 2  # sluice and the Envoy sidecar
    assert "allowPrivilegeEscalation: false" in text
    assert "service: readiness" in text  # readiness is the picker's gRPC health service


def test_operator_flags_in_the_chart_exist() -> None:
    from epp_operator import settings

    parser = settings.build_argument_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    text = (CHART / "templates" / "deployment.yaml").read_text(encoding="utf-8")
    used = set(re.findall(r"- (--[a-z-]+)", text))
    assert used and used <= known, used - known


def test_envoy_bootstraps_are_current() -> None:
    spec = importlib.util.spec_from_file_location("render_envoy", CHART / "render_envoy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for mode in module.FailureMode:
        for transport in module.TRANSPORTS:
            path = CHART / "files" / f"envoy-{mode.value}-{transport}.json"
            committed = path.read_text(encoding="utf-8")
            expected = module.render(mode, transport)
            assert committed == expected, f"run python {CHART}/render_envoy.py"
            assert committed.count(str(module.LISTEN_PORT)) == 1  # the chart substitutes it


def test_envoy_timeout_values_replace_what_the_rendered_bootstraps_hold() -> None:
    """configmap.yaml swaps each rendered default for its value: the rendered text must
    occur once per file, and the value's default must be that same duration."""
    template = (CHART / "templates" / "configmap.yaml").read_text(encoding="utf-8")
    replaced = re.findall(
        r'replace "\\"(\w+)\\": \\"([0-9.]+)s\\"" \(printf ".+?" \(toJson \$envoy\.(\w+)\)\)',
        template,
    )
    envoy = _values()["envoy"]
    assert {value for _, _, value in replaced} == {
        "routeTimeout", "idleTimeout", "requestTimeout", "pickerMessageTimeout"
    }  # fmt: skip
    for path in sorted((CHART / "files").glob("envoy-*.json")):
        text = path.read_text(encoding="utf-8")
        for key, seconds, value in replaced:
            assert text.count(f'"{key}": "{seconds}s"') == 1, (path.name, key)
            assert float(envoy[value].removesuffix("s")) == float(seconds), value
