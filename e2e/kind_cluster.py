"""A throwaway kind cluster with the Sluice image loaded, driven through kubectl and helm.

Everything is a real command line, as a platform engineer would type it; failures carry
the command's stderr so a red e2e run says what broke.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMAGE = "sluice:e2e"
TOOLS = ("kind", "docker", "kubectl", "helm")


def missing_prerequisites() -> str | None:
    """Why the e2e tests cannot run here, or None when they can."""
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"kind-based e2e needs {', '.join(TOOLS)}; not installed: {', '.join(absent)}"
    engine = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if engine.returncode != 0:
        return "kind-based e2e needs a running Docker engine (`docker info` failed)"
    return None


def run(*args: str, input_text: str | None = None, timeout_s: float = 600) -> str:
    result = subprocess.run(
        list(args), capture_output=True, text=True, input=input_text, timeout=timeout_s
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


class KindCluster:
    def __init__(self, name: str, kubeconfig: Path) -> None:
        self.name = name
        self.kubeconfig = kubeconfig

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        return run("kubectl", "--kubeconfig", str(self.kubeconfig), *args, input_text=input_text)

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]]) -> None:
        items = manifest if isinstance(manifest, list) else [manifest]
        self.kubectl(
            "apply",
            "-f",
            "-",
            input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def helm(self, *args: str) -> str:
        return run("helm", "--kubeconfig", str(self.kubeconfig), *args)


@contextlib.contextmanager
def kind_cluster(workdir: Path) -> Iterator[KindCluster]:
    name = f"sluice-e2e-{uuid.uuid4().hex[:6]}"
    kubeconfig = workdir / "kubeconfig"
    run("docker", "build", "-t", IMAGE, str(REPO), timeout_s=1800)
    run("kind", "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig),
        "--wait", "180s")  # fmt: skip
    try:
        run("kind", "load", "docker-image", IMAGE, "--name", name)
        cluster = KindCluster(name, kubeconfig)
        cluster.kubectl("apply", "-f", str(REPO / "crds"))
        yield cluster
    finally:
        run("kind", "delete", "cluster", "--name", name)
