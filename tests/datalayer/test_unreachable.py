"""A model server that refuses connections leaves routing at its first failed scrape, not
when its metrics go stale."""

from __future__ import annotations

import contextlib

import orjson

from tests.support.backends import backends
from tests.support.extproc_client import (
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    set_headers,
)
from tests.support.picker import fresh_metrics, running_picker, wait_for

COMPLETION = orjson.dumps({"model": "m", "prompt": "hello"})


async def destination(client: ExtProcClient) -> str:
    call = client.open()
    await call.write(request_headers(completion_headers()))
    await call.write(request_body(COMPLETION))
    target = set_headers(await call.read())["x-gateway-destination-endpoint"]
    call.cancel()
    return target


async def test_a_refused_scrape_stops_routing_at_once():
    async with contextlib.AsyncExitStack() as stack:
        live = (await stack.enter_async_context(backends(["127.0.0.2"])))[0]
        doomed_context = backends(["127.0.0.3"])
        doomed = (await doomed_context.__aenter__())[0]
        picker = await stack.enter_async_context(
            running_picker(
                endpoints=f"{live.target},{doomed.target}",
                metrics_staleness_threshold_s=60.0,  # staleness alone would take a minute
            )
        )
        client = ExtProcClient(picker.grpc_port)
        stack.push_async_callback(client.close)
        doomed.state.waiting = 0
        live.state.waiting = 5  # the doomed one is the better choice while it is there
        await fresh_metrics(picker)
        assert await destination(client) == doomed.target
        key = next(e.key for e in picker.reconciler.current.endpoints if e.port == doomed.port)
        status = picker.collector.status(key)
        assert status is not None

        await doomed_context.__aexit__(None, None, None)  # its port now refuses connections
        await wait_for(lambda: status.consecutive_failures >= 1, what="a failed scrape")
        assert picker.metrics_store.get(key).unreachable  # from that first failure on
        assert "cannot connect" in (status.last_error or "")
        assert {await destination(client) for _ in range(20)} == {live.target}
