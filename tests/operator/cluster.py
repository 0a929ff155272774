"""An emulated cluster for operator tests: kmock with the gaps kopf relies on filled in.

kmock 0.8 keeps objects and serves list/watch/create/patch/delete, but does not maintain
``resourceVersion``, ``uid``, ``generation`` or ``generateName`` (kopf keys its per-object
workers by uid, and status needs generation); :class:`ClusterEmulator` fills those in on
every write. A :class:`ConnectionGate` sits between the operator and the emulator so a
test can make the API server vanish and come back on the same address.
Objects are always written with ``metadata.namespace`` (kmock routes namespace-less
objects to no namespaced watch), and nothing relies on label selectors (kmock ignores them).

kmock keeps no event history, so it cannot resume a watch from a ``resourceVersion``; a real
API server answers such a watch with "410 Gone" once its history no longer reaches back
that far. The emulator does the same whenever the resource changed since that version, so
the client takes the same path as after a long outage: list again, then watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import kmock

RESOURCES = {
    "v1/pods": ("Pod", set()),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/events": ("Event", set()),
    "inference.networking.k8s.io/v1/inferencepools": ("InferencePool", {"status"}),
    "inference.networking.x-k8s.io/v1alpha2/inferenceobjectives": ("InferenceObjective", set()),
    "inference.networking.x-k8s.io/v1alpha2/inferencemodelrewrites": (
        "InferenceModelRewrite",
        set(),
    ),
    "sluice.dev/v1alpha1/workloadclasses": ("WorkloadClass", {"status"}),
}
CLUSTER_SCOPED = {
    "v1/namespaces": "Namespace",
    "apiextensions.k8s.io/v1/customresourcedefinitions": "CustomResourceDefinition",
}
PLURALS = {kind: key for key, (kind, _) in RESOURCES.items()}


class ClusterEmulator(kmock.KubernetesEmulator):
    # kmock's class uses slots; this subclass keeps its own state in an instance dict.
    def _state(self) -> dict[str, Any]:
        return self.__dict__.setdefault("_sluice", {"version": 0, "last_write": {}})  # type: ignore[no-any-return]

    async def _serve_list(self, request: kmock.Request) -> Any:
        listed = await super()._serve_list(request)
        last = self._state()["last_write"].get(request.resource, 0)
        listed["metadata"]["resourceVersion"] = str(last)
        return listed

    async def _serve_watch(self, request: kmock.Request) -> Any:
        since = request.params.get("resourceVersion", "")
        if since.isdigit() and int(since) < self._state()["last_write"].get(request.resource, 0):
            yield b""
            yield {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "code": 410,
                    "reason": "Expired",
                    "message": f"too old resource version: {since}",
                },
            }
            return
        async for event in super()._serve_watch(request):
            yield event

    def limit_request_log(self, keep: int) -> None:
        """Keep only the last `keep` requests: kmock matches each request against its whole
        log, which makes long runs (benchmarks) quadratic."""
        self._state()["keep"] = keep

    async def _handle(self, request: kmock.Request) -> Any:
        keep = self._state().get("keep")
        if keep:
            del self._requests[:-keep]
        writes = (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
        if request.resource is not None and request.action in writes:
            state = self._state()
            state["version"] += 1
            state["last_write"][request.resource] = state["version"]
            if isinstance(request.data, dict) and request.action != kmock.action.DELETE:
                self._fill_metadata(request, request.data, state["version"])
        return await super()._handle(request)

    def _fill_metadata(self, request: kmock.Request, data: dict[str, Any], version: int) -> None:
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = str(version)
        if request.action == kmock.action.CREATE:
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("generation", 1)
            meta.setdefault(
                "creationTimestamp",
                datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
        elif request.name is not None and "spec" in data and not request.subresource:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects:
                current = self.objects[key].get("metadata", {}).get("generation", 1)
                meta["generation"] = int(current) + 1


class ConnectionGate:
    """A TCP forwarder in front of the emulator that a test can close and reopen."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Refuse new connections and cut every open one (an API server going away)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))


class Cluster:
    """Test-side writes to the emulated API (they show up in the request log as kmock's)."""

    def __init__(self, emulator: ClusterEmulator, gate: ConnectionGate) -> None:
        self.emulator = emulator
        self.gate = gate

    @staticmethod
    def _path(kind: str, namespace: str, name: str | None = None) -> str:
        group_version, plural = PLURALS[kind].rsplit("/", 1)
        root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        path = f"{root}/namespaces/{namespace}/{plural}"
        return f"{path}/{name}" if name else path

    async def create(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        meta.setdefault("namespace", "default")
        response = await self.emulator.post(self._path(obj["kind"], meta["namespace"]), json=obj)
        assert response.status < 300, await response.text()

    async def patch(self, kind: str, namespace: str, name: str, change: dict[str, Any]) -> None:
        response = await self.emulator.patch(
            self._path(kind, namespace, name),
            json=change,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert response.status < 300, await response.text()

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        response = await self.emulator.delete(self._path(kind, namespace, name))
        assert response.status < 300, await response.text()

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        key = (kmock.resource(PLURALS[kind]), namespace, name)
        return dict(self.emulator.objects[key])

    def events(self) -> list[dict[str, Any]]:
        resource = kmock.resource("v1/events")
        return [
            dict(obj)
            for (res, _, _), obj in self.emulator.objects.items()
            if res == resource and not obj.deleted
        ]

    def operator_writes(self) -> list[kmock.Request]:
        """Every write the operator (kopf's client, not the test's) sent to the API."""
        return [
            r
            for r in self.emulator
            if r.method
            in (kmock.method.POST, kmock.method.PUT, kmock.method.PATCH, kmock.method.DELETE)
            and not r.headers.get("User-Agent", "").startswith("kmock/")
        ]


@contextlib.asynccontextmanager
async def emulated_cluster(request_log_limit: int = 0) -> AsyncIterator[Cluster]:
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        if request_log_limit:
            emulator.limit_request_log(request_log_limit)
        # kopf waits for these two to be discoverable before it starts any watch.
        for key, kind in CLUSTER_SCOPED.items():
            emulator.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=False, verbs={"list", "watch", "get"}
            )
        for key, (kind, subresources) in RESOURCES.items():
            emulator.resources[key] = kmock.ResourceInfo(
                kind=kind,
                namespaced=True,
                subresources=subresources,
                verbs={"list", "watch", "get", "create", "patch", "delete"},
            )
        gate = ConnectionGate(server.port)
        await gate.open()
        try:
            yield Cluster(emulator, gate)
        finally:
            await gate.close()
