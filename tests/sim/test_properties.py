"""Property tests: the KV pool's accounting and the engine's conservation laws hold for
any sequence of operations / any workload."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.sim import engine, prefix_cache, tokens

# -- KV block pool -------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.lists(st.integers(0, 6), max_size=5), st.integers(0, 4)),
        st.tuples(st.just("grow"), st.integers(0, 9), st.integers(1, 3)),
        st.tuples(st.just("publish"), st.integers(0, 9), st.lists(st.integers(0, 6), max_size=4)),
        st.tuples(st.just("release"), st.integers(0, 9), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 12), operations=ops)
def test_pool_accounting_is_exact(
    capacity: int, operations: list[tuple[str, object, object]]
) -> None:
    pool = prefix_cache.KVBlockPool(capacity)
    leases: list[prefix_cache.BlockLease] = []
    for op, a, b in operations:
        if op == "alloc":
            assert isinstance(a, list) and isinstance(b, int)
            chain = list(a)
            matched = pool.match(chain)
            before = pool.blocks_in_use
            lease = pool.allocate(chain[:matched], b)
            if lease is not None:
                leases.append(lease)
                assert lease.num_blocks == matched + b
            else:
                assert pool.blocks_in_use == before
        elif leases:
            assert isinstance(a, int)
            lease = leases[a % len(leases)]
            if lease.released:
                continue
            if op == "grow":
                assert isinstance(b, int)
                pool.grow(lease, b)
            elif op == "publish":
                assert isinstance(b, list)
                pool.publish(lease, b)
            else:
                pool.release(lease)
        held = sum(lease.num_blocks for lease in leases)
        distinct_hashed = len({h for lease in leases for h in lease.hashed})
        anonymous = sum(lease.anonymous for lease in leases)
        assert pool.blocks_in_use == anonymous + distinct_hashed <= held
        assert 0 <= pool.blocks_in_use <= capacity
        assert pool.cached_blocks + anonymous <= capacity
    for lease in leases:
        pool.release(lease)
    assert pool.blocks_in_use == 0 and pool.usage == 0.0


# -- engine --------------------------------------------------------------------------

workload = st.lists(
    st.tuples(
        st.integers(0, 3),  # which shared prefix
        st.integers(0, 200),  # extra characters
        st.integers(1, 40),  # max_tokens
        st.sampled_from([None, "a", "b", "c"]),  # LoRA adapter
        st.integers(0, 3),  # arrival step
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(
    reqs=workload,
    max_num_seqs=st.integers(1, 6),
    kv_blocks=st.integers(40, 120),
    max_loras=st.integers(1, 2),
    abort_every=st.integers(0, 5),
)
def test_engine_serves_everything_and_frees_everything(
    reqs: list[tuple[int, int, int, str | None, int]],
    max_num_seqs: int,
    kv_blocks: int,
    max_loras: int,
    abort_every: int,
) -> None:
    model = engine.PerformanceModel(
        max_num_seqs=max_num_seqs,
        block_size=4,
        kv_cache_blocks=kv_blocks,
        max_loras=max_loras,
        ttft_ms=1.0,
        prefill_ms_per_token=0.01,
        itl_ms=1.0,
    )
    core = engine.EngineCore(model)
    prefixes = ["p" * 64, "q" * 48, "r" * 96, ""]
    made = [
        (
            at,
            engine.SimRequest(
                str(i),
                tokens.text_prompt(
                    prefixes[p] + "x" * extra or "x", 4, tokens.hash_seed(lora or "m")
                ),
                max_tokens,
                lora=lora,
            ),
        )
        for i, (p, extra, max_tokens, lora, at) in enumerate(reqs)
    ]
    now, step_no, aborted = 0.0, 0, set()
    while True:
        for at, r in made:
            if at == step_no:
                core.add(r, now)
        step = core.begin_step(now)
        assert core.num_running <= max_num_seqs
        assert len(core.loaded_loras) <= max_loras
        assert core.pool.blocks_in_use <= kv_blocks
        if step is None and step_no > 3:
            break
        if step is not None:
            now += step.duration_s
            core.end_step(step, now)
        if abort_every and step_no % abort_every == 0 and core.num_running:
            victim = next(r for _, r in made if r.phase is engine.Phase.RUNNING)
            core.abort(victim, now)
            aborted.add(victim.request_id)
        step_no += 1
        assert step_no < 10_000
    assert core.num_waiting == 0 and core.num_running == 0
    assert core.pool.blocks_in_use == 0
    finished = [r for _, r in made if r.request_id not in aborted]
    assert all(r.phase is engine.Phase.FINISHED and r.generated == r.max_tokens for r in finished)
    stats = core.stats
    assert stats.request_success["length"] == len(finished)
    assert stats.request_success["abort"] == len(aborted)
    assert stats.generation_tokens == sum(r.generated for _, r in made)
    assert stats.e2e.count == len(finished)
    for r in finished:
        assert r.first_token_s is not None and r.finished_s is not None
        assert r.arrival_s <= r.first_token_s <= r.finished_s
