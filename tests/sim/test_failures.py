"""Failure injection: error rate, slow start, going silent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sluice.sim import config, engine, fleet
from tests.sim import support

PAYLOAD = {"model": "sim-model", "prompt": "hello", "max_tokens": 2}


def sim(**changes: object) -> config.SimConfig:
    perf = engine.PerformanceModel(ttft_ms=1.0, itl_ms=1.0)
    return config.SimConfig(performance=perf, time_scale=0.1).replace(**changes)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_failure_rate_one_fails_every_request(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim(failure_rate=1.0, failure_status=429)) as servers:
        url = servers[0].url
        for _ in range(3):
            status, body, headers = await support.complete(session, url, PAYLOAD)
            assert status == 429
            assert body["type"] == "RateLimitError" and body["code"] == 429
            assert headers["x-inference-pod"] == "sim-0"
        async with session.get(f"{url}/health") as resp:
            assert resp.status == 200  # only inference requests fail
        samples = await support.scrape(session, url)
    assert support.value(samples, "vllm:request_success_total", finished_reason="length") == 0


async def test_failure_rate_is_a_seeded_fraction(session: aiohttp.ClientSession) -> None:
    async def statuses(seed: int) -> list[int]:
        cfg = sim(failure_rate=0.3, seed=seed)
        async with fleet.run_fleet(1, config=cfg) as servers:
            return [
                (await support.complete(session, servers[0].url, PAYLOAD))[0] for _ in range(60)
            ]

    first, again = await statuses(7), await statuses(7)
    assert first == again  # deterministic for a seed and pod name
    failed = first.count(503)
    assert set(first) == {200, 503}
    assert 8 <= failed <= 30


async def test_slow_start_answers_503_then_serves(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim(slow_start_s=0.3)) as servers:
        url = servers[0].url
        async with session.get(f"{url}/health") as resp:
            assert resp.status == 503
        status, body, _ = await support.complete(session, url, PAYLOAD)
        assert status == 503 and "starting" in body["message"]
        async with session.get(f"{url}/metrics") as resp:
            assert resp.status == 503

        async def healthy() -> None:
            while True:
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(healthy(), timeout=3)
        status, _, _ = await support.complete(session, url, PAYLOAD)
        assert status == 200


async def test_silence_holds_everything_until_lifted(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim()) as servers:
        url = servers[0].url
        async with session.post(f"{url}/sim/silence", json={"silent": True}) as resp:
            assert resp.status == 200 and (await resp.json())["silent"] is True
        short = aiohttp.ClientTimeout(total=0.2)
        for path in ("/metrics", "/health"):
            with pytest.raises(asyncio.TimeoutError):
                async with session.get(f"{url}{path}", timeout=short):
                    pass
        held = asyncio.create_task(support.complete(session, url, PAYLOAD))
        await support.until(lambda: servers[0].requests_received == 0 and not held.done())
        async with session.get(f"{url}/sim/state") as resp:
            assert (await resp.json())["silent"] is True
        async with session.post(f"{url}/sim/silence", json={"silent": False}) as resp:
            assert resp.status == 200
        status, body, _ = await asyncio.wait_for(held, timeout=3)
        assert status == 200 and body["usage"]["completion_tokens"] == 2
        async with session.post(f"{url}/sim/silence", json={"silent": "maybe"}) as resp:
            assert resp.status == 400


async def test_silent_after_stops_answering(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim(silent_after_s=0.05)) as servers:
        server = servers[0]
        await support.until(lambda: server.silent)
        with pytest.raises(asyncio.TimeoutError):
            async with session.get(
                f"{server.url}/metrics", timeout=aiohttp.ClientTimeout(total=0.2)
            ):
                pass
        server.set_silent(False)
        samples = await support.scrape(session, server.url)
    assert support.value(samples, "vllm:num_requests_running") == 0


async def test_silence_pauses_a_stream_mid_way(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim()) as servers:
        server = servers[0]
        async with session.post(
            f"{server.url}/v1/completions",
            json={
                **PAYLOAD,
                "max_tokens": 400,
                "stream": True,
            },
        ) as resp:
            await resp.content.readline()
            server.set_silent(True)
            core = server.engine.core
            await support.until(lambda: core.num_running == 0)  # engine finished the work
            server.set_silent(False)
            body = await resp.read()
    assert body.rstrip().endswith(b"data: [DONE]")
