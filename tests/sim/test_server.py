"""Simulated servers over real HTTP on 127.0.0.1: API shapes, performance model, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sluice.sim import config, engine, fleet
from tests.sim import support

FAST = engine.PerformanceModel(
    max_num_seqs=4,
    ttft_ms=10.0,
    prefill_ms_per_token=1.0,
    itl_ms=10.0,
    decode_batch_factor=0.1,
    kv_cache_blocks=512,
)


def sim(**changes: Any) -> config.SimConfig:
    perf = changes.pop("performance", FAST)
    return config.SimConfig(performance=perf, time_scale=0.05, **changes)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_ttft_grows_with_uncached_prompt_and_drops_on_prefix_hit(
    session: aiohttp.ClientSession,
) -> None:
    async with fleet.run_fleet(1, config=sim()) as servers:
        url = servers[0].url

        async def ttft_of(prompt: str) -> tuple[float, int]:
            before = await support.scrape(session, url)
            status, body, _ = await support.complete(
                session, url, {"model": "sim-model", "prompt": prompt, "max_tokens": 1}
            )
            assert status == 200
            after = await support.scrape(session, url)
            name = "vllm:time_to_first_token_seconds_sum"
            ttft = support.value(after, name) - support.value(before, name)
            return ttft, body["usage"]["prompt_tokens_details"]["cached_tokens"]

        short, short_cached = await ttft_of("a" * 4 * 16)  # 16 tokens
        long_prompt = "".join(f"{i:04d}" for i in range(800))  # 800 tokens, 50 blocks
        long, long_cached = await ttft_of(long_prompt)
        hit, hit_cached = await ttft_of(long_prompt)
    assert short_cached == 0 and long_cached == 0
    assert hit_cached == 784  # 49 of 50 blocks: the last block is always recomputed
    # Modelled: (10 ms + 1 ms/token) x 0.05 -> 1.3 ms, 40.5 ms, 1.3 ms (16 uncached).
    assert long == pytest.approx(0.0405, abs=0.01)
    assert long > 5 * short
    assert hit < long / 5


async def test_requests_queue_beyond_max_num_seqs(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim()) as servers:
        server = servers[0]
        core = server.engine.core
        payload = {"model": "sim-model", "prompt": "queue me", "max_tokens": 100}
        tasks = [
            asyncio.create_task(support.complete(session, server.url, payload)) for _ in range(7)
        ]
        await support.until(lambda: core.num_running + core.num_waiting == 7)
        samples = await support.scrape(session, server.url)
        assert support.value(samples, "vllm:num_requests_running") == 4
        assert support.value(samples, "vllm:num_requests_waiting") == 3
        results = await asyncio.gather(*tasks)
        samples = await support.scrape(session, server.url)
    assert all(status == 200 for status, _, _ in results)
    assert support.value(samples, "vllm:num_requests_waiting") == 0
    assert support.value(samples, "vllm:num_requests_running") == 0
    queued = support.value(samples, "vllm:request_queue_time_seconds_sum")
    assert queued > 0.0


async def test_kv_usage_rises_with_load_and_returns_to_idle(
    session: aiohttp.ClientSession,
) -> None:
    async with fleet.run_fleet(1, config=sim()) as servers:
        server = servers[0]
        idle = support.value(await support.scrape(session, server.url), "vllm:kv_cache_usage_perc")
        tasks = [
            asyncio.create_task(
                support.complete(
                    session,
                    server.url,
                    {
                        "model": "sim-model",
                        "prompt": f"{i}" * 4 * 300,
                        "max_tokens": 60,
                    },
                )
            )
            for i in range(4)
        ]
        await support.until(lambda: server.engine.core.num_running == 4)
        busy = support.value(await support.scrape(session, server.url), "vllm:kv_cache_usage_perc")
        await asyncio.gather(*tasks)
        after = support.value(await support.scrape(session, server.url), "vllm:kv_cache_usage_perc")
    assert idle == 0.0
    assert busy >= 4 * 19 / 512  # 300-token prompts hold 19 blocks each
    assert after == 0.0


async def test_counters_equal_what_was_served(session: aiohttp.ClientSession) -> None:
    prompts = ["short", "x" * 400, "x" * 400 + "tail", "y" * 999]
    async with fleet.run_fleet(1, config=sim()) as servers:
        url = servers[0].url
        results = await asyncio.gather(
            *(
                support.complete(
                    session, url, {"model": "sim-model", "prompt": p, "max_tokens": 3 + i}
                )
                for i, p in enumerate(prompts)
            )
        )
        chat = await support.stream(
            session,
            url,
            {
                "model": "sim-model",
                "messages": [{"role": "user", "content": "hi"}],
                "stream_options": {"include_usage": True},
            },
            chat=True,
        )
        samples = await support.scrape(session, url)
    usages = [body["usage"] for _, body, _ in results] + [chat[-2]["usage"]]
    assert support.value(samples, "vllm:prompt_tokens_total") == sum(
        u["prompt_tokens"] for u in usages
    )
    assert support.value(samples, "vllm:generation_tokens_total") == sum(
        u["completion_tokens"] for u in usages
    )
    assert support.value(samples, "vllm:prefix_cache_hits_total") == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in usages
    )
    assert support.value(samples, "vllm:prefix_cache_queries_total") == sum(
        u["prompt_tokens"] for u in usages
    )
    assert support.value(samples, "vllm:request_success_total", finished_reason="length") == 4
    assert support.value(samples, "vllm:request_success_total", finished_reason="stop") == 1
    assert chat[-2]["usage"]["completion_tokens"] == config.SimConfig().default_max_tokens
    for histogram in ("time_to_first_token", "e2e_request_latency"):
        assert support.value(samples, f"vllm:{histogram}_seconds_count") == 5
    tokens_after_first = sum(u["completion_tokens"] - 1 for u in usages)
    assert support.value(samples, "vllm:inter_token_latency_seconds_count") == tokens_after_first


@pytest.mark.parametrize("chat", [False, True])
async def test_streaming_and_non_streaming_agree(
    session: aiohttp.ClientSession, chat: bool
) -> None:
    payload: dict[str, Any] = {"model": "sim-model", "max_tokens": 7}
    if chat:
        payload["messages"] = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        ]
    else:
        payload["prompt"] = "The quick brown fox"
    async with fleet.run_fleet(2, config=sim()) as servers:
        _, plain, _ = await support.complete(session, servers[0].url, payload, chat=chat)
        events = await support.stream(
            session,
            servers[1].url,
            {**payload, "stream_options": {"include_usage": True}},
            chat=chat,
        )
        no_usage = await support.stream(session, servers[1].url, payload, chat=chat)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]
    assert all("usage" not in e for e in no_usage[:-1])
    token_events = [e for e in events[:-2] if e["choices"][0].get("delta", {}).get("role") is None]
    if chat:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(e["choices"][0]["delta"]["content"] for e in token_events)
        assert text == plain["choices"][0]["message"]["content"]
        assert plain["object"] == "chat.completion"
        assert events[1]["object"] == "chat.completion.chunk"
    else:
        text = "".join(e["choices"][0]["text"] for e in token_events)
        assert text == plain["choices"][0]["text"]
        assert plain["object"] == "text_completion"
    assert len(token_events) == 7
    assert token_events[-1]["choices"][0]["finish_reason"] == "length"
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 7
    assert plain["usage"]["total_tokens"] == plain["usage"]["prompt_tokens"] + 7


BAD_REQUESTS: list[tuple[str, bytes | dict[str, Any], int, str]] = [
    ("/v1/completions", b"{not json", 400, "Invalid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "hi"}, 400, "'model' is required"),
    ("/v1/completions", {"model": 7, "prompt": "hi"}, 400, "'model' must be a string"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "does not exist"),
    ("/v1/completions", {"model": "sim-model"}, 400, "'prompt' is required"),
    ("/v1/completions", {"model": "sim-model", "prompt": 5}, 400, "'prompt' must be"),
    ("/v1/completions", {"model": "sim-model", "prompt": ""}, 400, "cannot be empty"),
    ("/v1/completions", {"model": "sim-model", "prompt": ["a", "b"]}, 400, "Batched"),
    (
        "/v1/completions",
        {"model": "sim-model", "prompt": "hi", "max_tokens": "9"},
        400,
        "must be an integer",
    ),
    ("/v1/completions", {"model": "sim-model", "prompt": "hi", "max_tokens": 0}, 400, "at least 1"),
    (
        "/v1/completions",
        {"model": "sim-model", "prompt": "hi", "max_tokens": 10**6},
        400,
        "maximum context length",
    ),
    (
        "/v1/completions",
        {"model": "sim-model", "prompt": "hi", "stream": "yes"},
        400,
        "'stream' must be a boolean",
    ),
    (
        "/v1/completions",
        {"model": "sim-model", "prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        "stream=True",
    ),
    ("/v1/completions", {"model": "sim-model", "prompt": "hi", "n": 2}, 400, "n=1"),
    ("/v1/chat/completions", {"model": "sim-model"}, 400, "'messages' is required"),
    ("/v1/chat/completions", {"model": "sim-model", "messages": []}, 400, "non-empty"),
    ("/v1/chat/completions", {"model": "sim-model", "messages": ["hi"]}, 400, "an object"),
    (
        "/v1/chat/completions",
        {"model": "sim-model", "messages": [{"content": "x"}]},
        400,
        "role must be a string",
    ),
    (
        "/v1/chat/completions",
        {"model": "sim-model", "messages": [{"role": "user", "content": 3}]},
        400,
        "content must be",
    ),
    (
        "/v1/chat/completions",
        {
            "model": "sim-model",
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": -1,
        },
        400,
        "at least 1",
    ),
]


async def test_bad_requests_get_vllm_shaped_errors(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim(max_model_len=4096)) as servers:
        url = servers[0].url
        for path, body, status, message in BAD_REQUESTS:
            kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.post(f"{url}{path}", **kwargs) as resp:
                error = await resp.json()
                assert resp.status == status, (body, error)
                assert resp.headers["x-inference-pod"] == "sim-0"
            assert error["object"] == "error"
            assert error["code"] == status
            assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
            assert message in error["message"], (body, error)
        samples = await support.scrape(session, url)
        assert servers[0].engine.core.num_waiting == 0
    assert support.value(samples, "vllm:prompt_tokens_total") == 0


async def test_lora_adapters_show_in_models_and_lora_requests_info(
    session: aiohttp.ClientSession,
) -> None:
    perf = engine.PerformanceModel(max_num_seqs=8, itl_ms=10.0, max_loras=1)
    async with fleet.run_fleet(1, config=sim(lora_modules=("sql", "chat"), performance=perf)) as fs:
        server = fs[0]
        async with session.get(f"{server.url}/v1/models") as resp:
            models = {m["id"]: m for m in (await resp.json())["data"]}
        assert set(models) == {"sim-model", "sql", "chat"}
        assert models["sql"]["parent"] == "sim-model"
        tasks = [
            asyncio.create_task(
                support.complete(
                    session,
                    server.url,
                    {"model": name, "prompt": "adapter please", "max_tokens": 40},
                )
            )
            for name in ("sql", "chat")
        ]
        core = server.engine.core
        await support.until(lambda: core.num_running == 1 and core.num_waiting == 1)
        samples = await support.scrape(session, server.url)
        info = support.labels_of(samples, "vllm:lora_requests_info")
        assert info == {
            "running_lora_adapters": "sql",
            "waiting_lora_adapters": "chat",
            "max_lora": "1",
        }
        assert support.value(samples, "vllm:lora_requests_info") > 1.7e9  # a unix timestamp
        results = await asyncio.gather(*tasks)
        samples = await support.scrape(session, server.url)
    assert [status for status, _, _ in results] == [200, 200]
    assert [body["model"] for _, body, _ in results] == ["sql", "chat"]
    assert support.labels_of(samples, "vllm:lora_requests_info") == {
        "running_lora_adapters": "",
        "waiting_lora_adapters": "",
        "max_lora": "1",
    }


async def test_no_lora_info_without_adapters(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim()) as servers:
        samples = await support.scrape(session, servers[0].url)
    assert not [n for n, _ in samples if n == "vllm:lora_requests_info"]
    info = support.labels_of(samples, "vllm:cache_config_info")
    assert info["block_size"] == "16" and info["num_gpu_blocks"] == "512"


async def test_client_disconnect_aborts_the_request(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim()) as servers:
        server = servers[0]
        resp = await session.post(
            f"{server.url}/v1/completions",
            json={"model": "sim-model", "prompt": "long", "max_tokens": 5000, "stream": True},
        )
        await resp.content.readline()
        assert server.engine.core.num_running == 1
        resp.close()
        await support.until(lambda: server.engine.core.num_running == 0)
        with pytest.raises(asyncio.TimeoutError):  # non-streaming: the client gives up
            await session.post(
                f"{server.url}/v1/completions",
                json={"model": "sim-model", "prompt": "long", "max_tokens": 5000},
                timeout=aiohttp.ClientTimeout(total=0.1),
            )
        await support.until(lambda: server.engine.core.stats.request_success["abort"] == 2)
        assert server.engine.core.num_running == 0
        samples = await support.scrape(session, server.url)
    assert support.value(samples, "vllm:request_success_total", finished_reason="abort") == 2
    assert support.value(samples, "vllm:kv_cache_usage_perc") == 0.0


async def test_picker_parser_reads_the_metrics_page_strictly(
    session: aiohttp.ClientSession,
) -> None:
    """The contract with the picker's data layer: its strict parser accepts the page and
    its lazy per-name lookup finds the gauges the core extractor reads."""
    from epp.datalayer import prometheus_text

    cfg = sim(lora_modules=("sql",))
    async with fleet.run_fleet(1, config=cfg) as servers:
        await support.complete(
            session,
            servers[0].url,
            {"model": "sql", "prompt": 'quote " and \\ back', "max_tokens": 2},
        )
        async with session.get(f"{servers[0].url}/metrics") as resp:
            text = await resp.text()
    exposition = prometheus_text.parse(text, strict=True)
    assert exposition.by_name("vllm:request_success_total")
    page = prometheus_text.MetricsPage(text)
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    ):
        assert len(page.samples(name)) == 1, name
    assert not page.errors


async def test_runtime_lora_loading_and_request_id_echo(session: aiohttp.ClientSession) -> None:
    async with fleet.run_fleet(1, config=sim()) as servers:
        url = servers[0].url
        async with session.post(
            f"{url}/v1/load_lora_adapter",
            json={"lora_name": "fresh", "lora_path": "/adapters/fresh"},
        ) as r:
            assert r.status == 200
        async with session.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": "/x"}
        ) as r:
            assert r.status == 400
        async with session.get(f"{url}/v1/models") as r:
            cards = {m["id"]: m for m in (await r.json())["data"]}
        assert cards["fresh"]["root"] == "/adapters/fresh"
        async with session.post(
            f"{url}/v1/completions",
            headers={"x-request-id": "abc-1"},
            json={"model": "fresh", "prompt": "hi", "max_tokens": 1},
        ) as r:
            assert r.status == 200 and r.headers["x-request-id"] == "abc-1"
        samples = await support.scrape(session, url)
        assert support.labels_of(samples, "vllm:lora_requests_info")["max_lora"] == "1"
        async with session.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "fresh"}) as r:
            assert r.status == 200
        status, body, _ = await support.complete(
            session, url, {"model": "fresh", "prompt": "hi", "max_tokens": 1}
        )
    assert status == 404 and body["type"] == "NotFoundError"
