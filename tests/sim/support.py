"""Helpers for talking to simulated servers over real HTTP in tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(session: aiohttp.ClientSession, base_url: str) -> Samples:
    async with session.get(f"{base_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels`."""
    matches = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
    return matches[0]


def labels_of(samples: Samples, name: str) -> dict[str, str]:
    found = [dict(ls) for (n, ls), _ in samples.items() if n == name]
    assert len(found) == 1, f"{name}: {len(found)} series"
    return found[0]


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `condition()` holds, checking each loop turn (the engine runs on the
    same loop, so state changes are seen promptly)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.001)


async def complete(
    session: aiohttp.ClientSession, base_url: str, payload: dict[str, Any], *, chat: bool = False
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with session.post(f"{base_url}{path}", json=payload) as resp:
        return resp.status, orjson.loads(await resp.read()), resp.headers


async def stream(
    session: aiohttp.ClientSession, base_url: str, payload: dict[str, Any], *, chat: bool = False
) -> list[Any]:
    """All SSE `data:` payloads of a streamed response (JSON-decoded; `[DONE]` as str)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    events: list[Any] = []
    async with session.post(f"{base_url}{path}", json={**payload, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data: "):
                data = line[len(b"data: ") :]
                events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events
