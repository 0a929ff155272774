"""Sources that need no cluster: `--endpoints ip:port,...` and watched manifest files."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from epp.datastore import kube_objects
from epp.datastore.reconciler import Reconciler
from epp.datastore.snapshot import Endpoint, EndpointKey, is_ip_address

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A flag or file the sources cannot use."""


def parse_endpoints(text: str) -> list[Endpoint]:
    """`10.0.0.1:8000,[::1]:8001` into endpoints keyed `static/<ip:port>`."""
    endpoints: list[Endpoint] = []
    seen: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        address, sep, port_text = item.rpartition(":")
        address = address.removeprefix("[").removesuffix("]")
        if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise SourceError(f"--endpoints: {item!r} is not ip:port")
        if not is_ip_address(address):
            raise SourceError(f"--endpoints: {address!r} in {item!r} is not an IP address")
        endpoint = Endpoint(
            key=EndpointKey(f"static/{item}"),
            pod_name=item,
            namespace="static",
            address=address,
            port=int(port_text),
        )
        if endpoint.target in seen:
            raise SourceError(f"--endpoints: {item!r} is listed twice")
        seen.add(endpoint.target)
        endpoints.append(endpoint)
    return endpoints


def load_manifests(paths: Sequence[Path]) -> list[Mapping[str, Any]]:
    """Every supported object in the files; other kinds (Services, Deployments) are skipped."""
    objects: list[Mapping[str, Any]] = []
    for path in paths:
        try:
            documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except OSError as error:
            raise SourceError(f"{path}: cannot read: {error.strerror or error}") from error
        except yaml.YAMLError as error:
            raise SourceError(f"{path}: invalid YAML: {error}") from error
        for index, document in enumerate(documents):
            if document is None:
                continue
            if not isinstance(document, Mapping):
                raise SourceError(f"{path}: document {index + 1} is not a mapping")
            items = document.get("items") if document.get("kind") == "List" else [document]
            for obj in items or ():
                if isinstance(obj, Mapping) and obj.get("kind") in kube_objects.KINDS:
                    kube_objects.metadata(obj)  # fails early on objects without a name
                    objects.append(obj)
    return objects


class ManifestWatcher:
    """Reloads manifest files into the reconciler when they change.

    Polls file stat signatures: it works on every filesystem and in ConfigMap volumes
    (whose files change by symlink swap, which inotify watchers often miss). A file that
    fails to parse leaves the previous objects in force.
    """

    def __init__(self, reconciler: Reconciler, paths: Sequence[Path], poll_interval_s: float = 0.5):
        self._reconciler = reconciler
        self._paths = [Path(p) for p in paths]
        self._poll_interval_s = poll_interval_s
        self._signature: tuple[tuple[int, int, int], ...] | None = None
        self.reloads = 0
        self.last_error: str | None = None

    def _stat_signature(self) -> tuple[tuple[int, int, int], ...]:
        signature = []
        for path in self._paths:
            try:
                st = os.stat(path)
                signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                signature.append((-1, -1, -1))
        return tuple(signature)

    def load(self) -> None:
        """Load now; raises SourceError/ObjectError so start-up can fail with the reason."""
        self._signature = self._stat_signature()
        objects = load_manifests(self._paths)
        self._reconciler.replace(objects)
        self.reloads += 1
        problem = nothing_routed(objects, self._reconciler)
        if problem is not None:
            files = ", ".join(str(p) for p in self._paths)
            log.warning("%s: nothing to route to: %s", files, problem)

    def check(self) -> bool:
        """Reload if any file changed; returns whether a reload happened."""
        if self._stat_signature() == self._signature:
            return False
        try:
            self.load()
        except (SourceError, kube_objects.ObjectError) as error:
            self.last_error = str(error)
            log.error("manifests not reloaded, keeping the previous objects: %s", error)
            return False
        self.last_error = None
        log.info("manifests reloaded", extra={"snapshot": self._reconciler.current.version})
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            self.check()


def nothing_routed(objects: Sequence[Mapping[str, Any]], reconciler: Reconciler) -> str | None:
    """Why the manifests give the pool no endpoint, or None when they give some."""
    snapshot = reconciler.current
    if len(snapshot.endpoints) > len(reconciler.static_endpoints):
        return None
    pods = sum(1 for obj in objects if obj.get("kind") == "Pod")
    pools = [
        "/".join(kube_objects.metadata(obj))
        for obj in objects
        if obj.get("kind") == "InferencePool"
    ]
    pod_count = f"{pods} Pod{'' if pods == 1 else 's'}"
    if snapshot.pool is not None:
        return (
            f"InferencePool {snapshot.pool.namespace}/{snapshot.pool.name} selects no Pod "
            f"({pod_count} in the files; a Pod needs the pool's labels and namespace, "
            "status.podIP and a Ready condition that is True)"
        )
    if not pools:
        return f"no InferencePool ({pod_count} in the files; Pods are routed to through a pool)"
    wanted = pools[0] if len(pools) == 1 else None
    if reconciler.pool_name is not None:
        wanted = f"{reconciler.pool_namespace}/{reconciler.pool_name}"
        if wanted not in pools:
            return f"no InferencePool {wanted} (found: {', '.join(pools)}); check --pool-name"
    if wanted is not None:
        return f"InferencePool {wanted} is invalid (the error above says why)"
    return f"{len(pools)} InferencePools ({', '.join(pools)}) and no --pool-name to choose one"
