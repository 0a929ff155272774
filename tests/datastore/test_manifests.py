"""Manifest files as a source: loaded, watched, and broken edits keep the old objects."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from epp.datastore.reconciler import Reconciler
from epp.datastore.sources import ManifestWatcher, SourceError, load_manifests, parse_endpoints

POOL = """
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: default}
spec:
  selector: {matchLabels: {app: vllm}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: epp, port: {number: 9002}}
---
apiVersion: v1
kind: Service
metadata: {name: ignored}
"""

POD = """
apiVersion: v1
kind: Pod
metadata: {name: POD, namespace: default, labels: {app: vllm}}
status:
  podIP: ADDRESS
  conditions: [{type: Ready, status: "True"}]
"""


def write(path: Path, *pods: tuple[str, str]) -> None:
    docs = [POD.replace("POD", name).replace("ADDRESS", ip) for name, ip in pods]
    path.write_text(POOL + "---" + "---".join(docs) if docs else POOL)


def test_load_skips_other_kinds(tmp_path):
    path = tmp_path / "m.yaml"
    write(path, ("a", "10.0.0.1"))
    kinds = [o["kind"] for o in load_manifests([path])]
    assert kinds == ["InferencePool", "Pod"]


def test_list_documents_are_expanded(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("kind: List\nitems:\n- kind: Pod\n  metadata: {name: a}\n")
    assert [o["metadata"]["name"] for o in load_manifests([path])] == ["a"]


def test_broken_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: Pod\n  metadata: [\n")
    with pytest.raises(SourceError, match=r"bad.yaml: invalid YAML"):
        load_manifests([path])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="cannot read"):
        load_manifests([tmp_path / "nope.yaml"])


def test_changes_are_reconciled_and_broken_edits_keep_the_old_state(tmp_path):
    path = tmp_path / "m.yaml"
    write(path, ("a", "10.0.0.1"))
    reconciler = Reconciler(pool_name="pool")
    watcher = ManifestWatcher(reconciler, [path])
    watcher.load()
    assert [e.pod_name for e in reconciler.current.endpoints] == ["a"]
    assert watcher.check() is False  # nothing changed

    write(path, ("a", "10.0.0.1"), ("b", "10.0.0.2"))
    assert watcher.check() is True
    assert [e.pod_name for e in reconciler.current.endpoints] == ["a", "b"]

    path.write_text("kind: [broken")
    assert watcher.check() is False
    assert watcher.last_error is not None and "invalid YAML" in watcher.last_error
    assert [e.pod_name for e in reconciler.current.endpoints] == ["a", "b"]

    write(path, ("c", "10.0.0.3"))
    assert watcher.check() is True
    assert [e.pod_name for e in reconciler.current.endpoints] == ["c"]


OTHER_POOL = POOL.replace("name: pool,", "name: other,")


@pytest.mark.parametrize(
    ("text", "pool_name", "static", "problem"),
    [
        (POOL + "---" + POD, None, "", None),
        (
            POOL + "---" + POD.replace("app: vllm", "app: sglang"),
            None,
            "",
            "InferencePool default/pool selects no Pod (1 Pod in the files; a Pod needs",
        ),
        (POD, None, "", "no InferencePool (1 Pod in the files; Pods are routed to through a"),
        (
            POOL + "---" + POD,
            "elsewhere",
            "",
            "no InferencePool default/elsewhere (found: default/pool); check --pool-name",
        ),
        (
            POOL + "---" + OTHER_POOL + "---" + POD,
            None,
            "",
            "2 InferencePools (default/pool, default/other) and no --pool-name to choose one",
        ),
        (POOL, None, "127.0.0.1:8000", "InferencePool default/pool selects no Pod (0 Pods"),
    ],
)
def test_manifests_that_route_to_nothing_are_a_warning(
    tmp_path, caplog, text, pool_name, static, problem
):
    path = tmp_path / "m.yaml"
    path.write_text(text.replace("ADDRESS", "10.0.0.1").replace("POD", "a"))
    reconciler = Reconciler(
        pool_name=pool_name, static_endpoints=parse_endpoints(static) if static else ()
    )
    with caplog.at_level(logging.WARNING, logger="epp.datastore.sources"):
        ManifestWatcher(reconciler, [path]).load()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if problem is None:
        assert warnings == []
        assert len(reconciler.current.endpoints) == 1
    else:
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"{path}: nothing to route to: {problem}"), warnings[0]
