"""`simulator_process` on addresses of their own: two children, each server binding its
KV-event publisher on its own address at the same port, as pods do."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import zmq

from epp.datalayer import kv_events
from sluice.gateway.ports import free_tcp_port
from sluice.sim import child_process


async def test_servers_on_their_own_addresses_publish_on_the_same_port() -> None:
    hosts = ("127.0.0.21", "127.0.0.22")
    port = free_tcp_port(hosts[0])
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    async with contextlib.AsyncExitStack() as stack:
        addresses = []
        for i, host in enumerate(hosts):
            endpoint = f"tcp://{host}:{port}"  # "bind": a specific address, bound
            events = {"enable_kv_cache_events": True, "endpoint": endpoint, "bind": True}
            args = ["--pod-name-prefix", f"p{i}", "--kv-events-config", json.dumps(events)]
            [address] = await stack.enter_async_context(
                child_process.simulator_process(1, args, host=host)
            )
            addresses.append(address)
        assert [a.rsplit(":", 1)[0] for a in addresses] == list(hosts)
        subscribers = []
        for host in hosts:
            subscriber = context.socket(zmq.SUB)
            subscriber.setsockopt(zmq.SUBSCRIBE, b"")
            subscriber.connect(f"tcp://{host}:{port}")
            stack.callback(subscriber.close, 0)
            subscribers.append(subscriber)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        for address, subscriber in zip(addresses, subscribers, strict=True):
            topic = await _first_topic(session, address, subscriber)
            assert topic == f"kv@{address}@sim-model"
    context.term()


async def _first_topic(
    session: aiohttp.ClientSession, address: str, subscriber: zmq.Socket[bytes]
) -> str:
    """Serve prompts on `address` until its events reach `subscriber` (ZMQ drops what is
    published before the subscription is up); the topic of the first batch received.
    Polled: a ZMQ socket read without an event loop integration."""
    deadline = time.monotonic() + 10
    attempt = 0
    while time.monotonic() < deadline:
        body = {"model": "sim-model", "prompt": f"prompt {attempt} " * 20, "max_tokens": 1}
        attempt += 1
        async with session.post(f"http://{address}/v1/completions", json=body) as response:
            assert response.status == 200
        for _ in range(25):
            try:
                return kv_events.decode(subscriber.recv_multipart(zmq.NOBLOCK)).topic
            except zmq.Again:
                await asyncio.sleep(0.02)
    raise AssertionError(f"no KV events from {address}")
