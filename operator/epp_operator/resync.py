"""Catches deletions that happened while no watch was open.

When a watch stream breaks (API server restart, network cut, "410 Gone"), kopf lists the
resource again and reports what exists, but an object deleted in the gap never produces a
DELETED event: its endpoint would stay in the picker forever. So whenever kopf re-lists
after the initial sync (its listing events have no type), and every ``period_s`` as a
safety net, :class:`Resync` lists each fed kind itself and drops from the feed what the
API server no longer has. Objects the feed saw change after the list began are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from kubernetes_asyncio import client, config

from epp_operator import resources
from epp_operator.feed import ClusterFeed
from epp_operator.settings import OperatorOptions

log = logging.getLogger(__name__)


class Resync:
    def __init__(self, options: OperatorOptions, feed: ClusterFeed) -> None:
        self._options = options
        self._feed = feed
        self._api: client.ApiClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._again = False
        self.runs = 0

    def request(self) -> None:
        """Resync soon (kopf's loop). Requests during a run fold into one more run."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sluice-resync")

    def start_timer(self, period_s: float) -> None:
        """Also resync every `period_s` (kopf's loop), for watches that broke silently."""

        async def tick() -> None:
            while True:
                await asyncio.sleep(period_s)
                self.request()

        self._timer = asyncio.get_running_loop().create_task(tick(), name="sluice-resync-timer")

    async def close(self) -> None:
        for task in (self._timer, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._resync_all()
            except Exception as error:  # the next reconnect or period retries
                log.warning("resync after a watch restart failed: %s", error)
            self.runs += 1
            if not self._again:
                return

    async def _resync_all(self) -> None:
        for resource in resources.FED:
            since = self._feed.stamp()
            present = await self._list(resource)
            dropped = self._feed.retain(resource.kind, present, since)
            if dropped:
                log.info("%d %s(s) were deleted while the watch was down", dropped, resource.kind)

    async def _list(self, resource: resources.Resource) -> set[tuple[str, str]]:
        api = await self._client()
        namespaces: list[str | None]
        if resource is resources.POD:  # only the pool's namespace can hold its pods
            namespaces = [self._options.pool_namespace]
        elif self._options.clusterwide:
            namespaces = [None]
        else:
            namespaces = list(self._options.watched_namespaces)
        present: set[tuple[str, str]] = set()
        for namespace in namespaces:
            for item in await self._items(api, resource, namespace):
                meta = item.get("metadata") or {}
                present.add((meta.get("namespace") or "default", meta.get("name", "")))
        return present

    async def _items(
        self, api: client.ApiClient, resource: resources.Resource, namespace: str | None
    ) -> list[dict[str, Any]]:
        if resource is resources.POD:
            assert namespace is not None
            # The raw response: the reconciler wants dicts, not client models.
            response: Any = await client.CoreV1Api(api).list_namespaced_pod(
                namespace, _preload_content=False
            )
            body = await response.json()
        elif namespace is None:
            body = await client.CustomObjectsApi(api).list_cluster_custom_object(
                resource.group, resource.version, resource.plural
            )
        else:
            body = await client.CustomObjectsApi(api).list_namespaced_custom_object(
                resource.group, resource.version, namespace, resource.plural
            )
        return list(body.get("items") or [])

    async def _client(self) -> client.ApiClient:
        if self._api is None:
            configuration = client.Configuration()
            if self._options.api_server is not None:
                configuration.host = self._options.api_server
                configuration.verify_ssl = False
            else:
                try:
                    config.load_incluster_config(client_configuration=configuration)
                except config.ConfigException:
                    await config.load_kube_config(client_configuration=configuration)
            self._api = client.ApiClient(configuration)
        return self._api
