"""EngineCore driven step by step with a fake clock: timing, batching, caching, LoRA."""

from __future__ import annotations

import pytest

from sluice.sim import engine, tokens

BLOCK = 16
SEED = tokens.hash_seed("m")


def prompt(text: str) -> tokens.Prompt:
    return tokens.text_prompt(text, BLOCK, SEED)


def make_core(**overrides: object) -> engine.EngineCore:
    params: dict[str, object] = {
        "max_num_seqs": 4,
        "block_size": BLOCK,
        "kv_cache_blocks": 64,
        "ttft_ms": 10.0,
        "prefill_ms_per_token": 1.0,
        "itl_ms": 5.0,
        "decode_batch_factor": 0.5,
    }
    params.update(overrides)
    return engine.EngineCore(engine.PerformanceModel(**params))  # type: ignore[arg-type]


def run_until_idle(core: engine.EngineCore, now: float = 0.0) -> float:
    """Advance a fake clock step by step until the engine has nothing left to do."""
    while (step := core.begin_step(now)) is not None:
        now = max(now, step.latest_arrival_s) + step.duration_s
        core.end_step(step, now)
    return now


def test_first_token_time_is_base_plus_uncached_tokens() -> None:
    core = make_core()
    req = engine.SimRequest("a", prompt("x" * 4 * 100), max_tokens=1)  # 100 tokens
    core.add(req, 0.0)
    end = run_until_idle(core)
    assert req.first_token_s == pytest.approx((10.0 + 100 * 1.0) / 1000)
    assert end == req.finished_s
    assert req.finish_reason == "length"
    assert core.kv_cache_usage == 0.0


def test_prefix_hit_skips_cached_blocks() -> None:
    core = make_core()
    text = "abcd" * 100  # 100 tokens: 6 full blocks (96 tokens) + 4
    first = engine.SimRequest("a", prompt(text), max_tokens=1)
    core.add(first, 0.0)
    t = run_until_idle(core)
    second = engine.SimRequest("b", prompt(text), max_tokens=1)
    core.add(second, t)
    run_until_idle(core, t)
    assert first.cached_tokens == 0
    assert second.cached_tokens == 96
    assert second.first_token_s is not None
    assert second.first_token_s - t == pytest.approx((10.0 + 4 * 1.0) / 1000)
    assert core.stats.prefix_cache_queries == 200
    assert core.stats.prefix_cache_hits == 96


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    core = make_core()
    text = "abcd" * 32  # exactly 2 blocks
    for name in ("a", "b"):
        req = engine.SimRequest(name, prompt(text), max_tokens=1)
        core.add(req, 0.0)
        run_until_idle(core)
    assert req.cached_tokens == BLOCK  # one block reused, the last one recomputed


def test_decode_step_grows_with_batch() -> None:
    core = make_core(ttft_ms=0.0, prefill_ms_per_token=0.0)
    reqs = [engine.SimRequest(str(i), prompt("hello"), max_tokens=3) for i in range(3)]
    for r in reqs:
        core.add(r, 0.0)
    prefill = core.begin_step(0.0)
    assert prefill is not None and len(prefill.prefills) == 3
    core.end_step(prefill, 0.0)
    decode = core.begin_step(0.0)
    assert decode is not None and len(decode.decodes) == 3
    assert decode.duration_s == pytest.approx(5.0 * (1 + 0.5 * 2) / 1000)


def test_requests_beyond_max_num_seqs_wait_fifo() -> None:
    core = make_core(max_num_seqs=2)
    reqs = [engine.SimRequest(str(i), prompt("hi"), max_tokens=2) for i in range(5)]
    for r in reqs:
        core.add(r, 0.0)
    step = core.begin_step(0.0)
    assert step is not None
    assert core.num_running == 2 and core.num_waiting == 3
    assert [r.request_id for r in step.prefills] == ["0", "1"]
    run_until_idle(core)
    assert all(r.phase is engine.Phase.FINISHED for r in reqs)
    finish_order = sorted(reqs, key=lambda r: (r.finished_s, r.request_id))
    assert [r.request_id for r in finish_order] == ["0", "1", "2", "3", "4"]
    assert core.stats.request_success["length"] == 5
    assert core.stats.generation_tokens == 10
    assert core.stats.prompt_tokens == 5


def test_kv_usage_tracks_running_sequences() -> None:
    core = make_core(kv_cache_blocks=100)
    reqs = [engine.SimRequest(str(i), prompt(f"{i}" * 4 * 40), max_tokens=4) for i in range(4)]
    for r in reqs:
        core.add(r, 0.0)
    step = core.begin_step(0.0)
    assert step is not None
    assert core.kv_cache_usage == pytest.approx(4 * 3 / 100)  # 40 tokens = 3 blocks each
    run_until_idle(core)
    assert core.kv_cache_usage == 0.0
    assert core.pool.cached_blocks == 4 * 2  # full prompt blocks stay cached


def test_full_pool_preempts_newest_and_everything_completes() -> None:
    # 6 blocks; each request: 32-token prompt (2 blocks) growing to 2+ blocks while decoding.
    core = make_core(kv_cache_blocks=6, max_num_seqs=8)
    reqs = [engine.SimRequest(str(i), prompt(f"{i}" * 4 * 32), max_tokens=20) for i in range(3)]
    for r in reqs:
        core.add(r, 0.0)
    run_until_idle(core)
    assert all(r.phase is engine.Phase.FINISHED and r.generated == 20 for r in reqs)
    assert core.stats.preemptions > 0
    assert core.pool.blocks_in_use == 0


def test_oversized_request_is_rejected_up_front() -> None:
    core = make_core(kv_cache_blocks=2)
    with pytest.raises(ValueError, match="KV blocks"):
        core.add(engine.SimRequest("a", prompt("x" * 4 * 40), max_tokens=1), 0.0)


def test_abort_releases_blocks_and_counts_once() -> None:
    core = make_core()
    req = engine.SimRequest("a", prompt("x" * 200), max_tokens=50)
    core.add(req, 0.0)
    step = core.begin_step(0.0)
    assert step is not None and core.kv_cache_usage > 0
    core.abort(req, 0.001)
    core.abort(req, 0.002)
    core.end_step(step, 0.01)
    assert req.generated == 0
    assert core.kv_cache_usage == 0.0
    assert core.stats.request_success["abort"] == 1
    assert core.begin_step(0.01) is None


def test_lora_waits_for_a_free_slot() -> None:
    core = make_core(max_loras=1, lora_load_ms=7.0, ttft_ms=0.0, prefill_ms_per_token=0.0)
    a = engine.SimRequest("a", prompt("p"), max_tokens=3, lora="sql")
    b = engine.SimRequest("b", prompt("p"), max_tokens=1, lora="chat")
    c = engine.SimRequest("c", prompt("p"), max_tokens=1, lora="sql")
    for r in (a, b, c):
        core.add(r, 0.0)
    step = core.begin_step(0.0)
    assert step is not None
    assert {r.request_id for r in step.prefills} == {"a", "c"}  # b skipped, keeps its place
    assert step.duration_s == pytest.approx(0.007)
    assert core.running_loras() == ["sql"] and core.waiting_loras() == ["chat"]
    run_until_idle(core)
    assert b.phase is engine.Phase.FINISHED
    assert core.loaded_loras == ["chat"]


def test_batched_token_budget_spreads_prefills_over_steps() -> None:
    core = make_core(max_num_batched_tokens=150)
    reqs = [engine.SimRequest(str(i), prompt(f"{i}" * 4 * 100), max_tokens=1) for i in range(3)]
    for r in reqs:
        core.add(r, 0.0)
    first = core.begin_step(0.0)
    assert first is not None and [r.request_id for r in first.prefills] == ["0"]
    core.end_step(first, first.duration_s)
    run_until_idle(core, first.duration_s)
    assert reqs[0].first_token_s is not None and reqs[1].first_token_s is not None
    assert reqs[0].first_token_s < reqs[1].first_token_s


def test_prefix_caching_can_be_switched_off() -> None:
    core = make_core(enable_prefix_caching=False)
    for name in ("a", "b"):
        req = engine.SimRequest(name, prompt("abcd" * 100), max_tokens=1)
        core.add(req, 0.0)
        run_until_idle(core)
        assert req.cached_tokens == 0
    assert core.stats.prefix_cache_queries == 0 and core.pool.cached_blocks == 0
