from __future__ import annotations

import struct

import pytest
import xxhash

from epp.datastore.snapshot import EndpointKey
from epp.parameters import ParameterError
from epp.scheduling.interfaces import ProfileResult, SchedulingResult
from epp.scheduling.plugins import prefix_index
from epp.scheduling.plugins.prefix_producer import (
    PRUNE_INTERVAL_S,
    ApproxPrefixCacheProducer,
    PrefixMatch,
    PrefixSettings,
)
from epp.scheduling.plugins.prefix_scorer import PrefixCacheScorer, SelfIndexingPrefixCacheScorer
from tests.scheduling.builders import candidate, request

BLOCK = 64  # characters: 16 tokens x 4


def _reference_chain(model: str, salt: str, prompt: str, block: int) -> list[int]:
    """The hash chain written out directly against xxhash, independent of the plugin."""
    previous = xxhash.xxh64((model + salt).encode("utf-8")).intdigest()
    out = []
    for i in range(len(prompt) // block):
        h = xxhash.xxh64()
        h.update(prompt[i * block : (i + 1) * block].encode("utf-8"))
        h.update(struct.pack("<Q", previous))
        previous = h.intdigest()
        out.append(previous)
    return out


def _result(cand: object) -> SchedulingResult:
    return SchedulingResult({"default": ProfileResult((cand,))}, "default")  # type: ignore[arg-type]


def _key(name: str) -> EndpointKey:
    return EndpointKey(f"ns/{name}-rank-0")


# -- hash chain --------------------------------------------------------------------------


def test_hash_chain_matches_xxhash_computed_directly() -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 5  # 225 chars: 3 whole blocks
    hashes = prefix_index.hash_blocks("llama", "salt", prompt, BLOCK, 256)
    assert hashes == _reference_chain("llama", "salt", prompt, BLOCK)
    assert len(hashes) == 3
    # A fixed value pins the exact construction (model || salt seed, LE64 chaining).
    seed = xxhash.xxh64_intdigest(b"llamasalt")
    first = xxhash.xxh64_intdigest(prompt[:BLOCK].encode() + seed.to_bytes(8, "little"))
    assert hashes[0] == first


def test_hash_chain_non_ascii_blocks_are_characters_hashed_as_utf8() -> None:
    prompt = "é" * BLOCK * 2
    assert prefix_index.hash_blocks("m", "", prompt, BLOCK, 256) == _reference_chain(
        "m", "", prompt, BLOCK
    )


def test_hash_chain_limits_and_partial_block() -> None:
    assert prefix_index.hash_blocks("m", "", "x" * (BLOCK - 1), BLOCK, 256) == []
    assert len(prefix_index.hash_blocks("m", "", "x" * (BLOCK * 10 + 5), BLOCK, 256)) == 10
    assert len(prefix_index.hash_blocks("m", "", "x" * BLOCK * 10, BLOCK, 4)) == 4


def test_model_and_salt_separate_chains() -> None:
    prompt = "y" * BLOCK
    base = prefix_index.hash_blocks("m", "", prompt, BLOCK, 256)
    assert prefix_index.hash_blocks("other", "", prompt, BLOCK, 256) != base
    assert prefix_index.hash_blocks("m", "tenant-a", prompt, BLOCK, 256) != base


def test_equal_prefixes_share_leading_hashes() -> None:
    a = prefix_index.hash_blocks("m", "", "a" * BLOCK * 2 + "b" * BLOCK, BLOCK, 256)
    b = prefix_index.hash_blocks("m", "", "a" * BLOCK * 2 + "c" * BLOCK, BLOCK, 256)
    assert a[:2] == b[:2] and a[2] != b[2]


# -- index -------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_beyond_capacity() -> None:
    index = prefix_index.PrefixIndex()
    key = _key("a")
    index.record(key, [1, 2, 3], capacity=4)
    index.record(key, [4, 5], capacity=4)
    # Recorded last block first, so each prompt's head is its most recent entry.
    assert index.blocks(key) == [2, 1, 5, 4]  # 3 (the oldest) evicted; LRU first
    index.record(key, [2], capacity=4)  # touch
    index.record(key, [9], capacity=4)
    assert index.blocks(key) == [5, 4, 2, 9]
    index.record(key, [7], capacity=2)  # capacity shrink evicts down
    assert index.blocks(key) == [9, 7]


def test_record_order_keeps_prefix_heads_longest() -> None:
    index = prefix_index.PrefixIndex()
    key = _key("a")
    index.record(key, [10, 11, 12, 13], capacity=4)
    index.record(key, [20, 21], capacity=4)  # evicts the tail of the first prompt
    assert index.match([10, 11, 12, 13], [key]) == {key: 2}


def test_longest_prefix_match_counts_leading_blocks_only() -> None:
    index = prefix_index.PrefixIndex()
    a, b, c = _key("a"), _key("b"), _key("c")
    index.record(a, [1, 2, 3], capacity=100)
    index.record(b, [1, 2], capacity=100)
    index.record(b, [4], capacity=100)  # has 4 but not 3: the gap ends the match
    index.record(c, [2, 3, 4], capacity=100)  # no leading block at all
    assert index.match([1, 2, 3, 4], [a, b, c, _key("unknown")]) == {a: 3, b: 2}
    assert index.match([], [a]) == {}


def test_retain_and_forget() -> None:
    index = prefix_index.PrefixIndex()
    for name in "abc":
        index.record(_key(name), [1], capacity=10)
    index.retain([_key("a"), _key("b")])
    assert sorted(index.endpoints()) == [_key("a"), _key("b")]
    index.forget(_key("a"))
    assert index.endpoints() == [_key("b")] and len(index) == 1


# -- producer ----------------------------------------------------------------------------


def test_produce_stores_match_and_pre_request_records_primary_target() -> None:
    producer = ApproxPrefixCacheProducer()
    prompt = "p" * BLOCK * 3
    cands = [candidate("a"), candidate("b")]

    first = request(prompt)
    producer.produce(first, cands)
    data = first.plugin_data[producer.name]
    assert isinstance(data, PrefixMatch)
    assert data.total_blocks == 3 and dict(data.matched_blocks) == {}
    producer.pre_request(first, _result(cands[1]))
    assert len(producer.index.blocks(_key("b"))) == 3

    second = request(prompt + "q" * BLOCK)
    producer.produce(second, cands)
    data = second.plugin_data[producer.name]
    assert isinstance(data, PrefixMatch)
    assert data.total_blocks == 4 and dict(data.matched_blocks) == {_key("b"): 3}


def test_pre_request_without_produce_hashes_itself_and_ignores_empty_results() -> None:
    producer = ApproxPrefixCacheProducer()
    req = request("z" * BLOCK * 2)
    producer.pre_request(req, SchedulingResult({"default": None}, "default"))
    assert len(producer.index) == 0
    producer.pre_request(req, _result(candidate("a")))
    assert len(producer.index.blocks(_key("a"))) == 2


def test_lru_capacity_parameter_and_auto_tune() -> None:
    fixed = ApproxPrefixCacheProducer(settings=PrefixSettings(lru_capacity=2, auto_tune=False))
    req = request("k" * BLOCK * 5)
    fixed.pre_request(req, _result(candidate("a", cache_num_blocks=100)))
    assert len(fixed.index.blocks(_key("a"))) == 2  # autoTune off: the parameter wins

    tuned = ApproxPrefixCacheProducer(settings=PrefixSettings(lru_capacity=2))
    tuned.pre_request(req, _result(candidate("a", cache_num_blocks=3)))
    assert len(tuned.index.blocks(_key("a"))) == 3  # reported size, same block size assumed
    tuned.pre_request(req, _result(candidate("b")))
    assert len(tuned.index.blocks(_key("b"))) == 2  # nothing reported: the parameter


def test_auto_tune_converts_server_blocks_to_index_blocks() -> None:
    settings = PrefixSettings()  # 16-token blocks
    assert settings.capacity_for(candidate("a", cache_num_blocks=1000).metrics) == 1000
    # 1000 blocks of 32 tokens hold as many tokens as 2000 of our 16-token blocks.
    metrics = candidate("a", cache_num_blocks=1000, cache_block_size=32).metrics
    assert settings.capacity_for(metrics) == 2000
    metrics = candidate("a", cache_num_blocks=1000, cache_block_size=16).metrics
    assert settings.capacity_for(metrics) == 1000


def test_endpoints_not_seen_for_a_sweep_interval_are_dropped() -> None:
    now = [1000.0]
    producer = ApproxPrefixCacheProducer(clock=lambda: now[0])
    prompt = "w" * BLOCK
    for name in "ab":
        producer.pre_request(request(prompt), _result(candidate(name)))
    now[0] += PRUNE_INTERVAL_S + 1
    producer.produce(request(prompt), [candidate("a")])  # sweep: a and b both seen
    assert sorted(producer.index.endpoints()) == [_key("a"), _key("b")]
    now[0] += PRUNE_INTERVAL_S + 1
    producer.produce(request(prompt), [candidate("a")])  # b not seen since last sweep
    assert producer.index.endpoints() == [_key("a")]
    producer.retain([])
    assert len(producer.index) == 0


def test_producer_parameters() -> None:
    producer = ApproxPrefixCacheProducer.from_parameters(
        "fast-prefix",
        {
            "blockSizeTokens": 8,
            "maxPrefixBlocksToMatch": 4,
            "lruCapacityPerServer": 10,
            "autoTune": False,
        },
    )
    assert producer.name == "fast-prefix"
    assert producer.settings == PrefixSettings(32, 4, 10, False)
    assert ApproxPrefixCacheProducer.from_parameters("p", None).settings == PrefixSettings()
    with pytest.raises(ParameterError, match="blockSizeTokens: must be at least 1"):
        ApproxPrefixCacheProducer.from_parameters("p", {"blockSizeTokens": 0})
    with pytest.raises(ParameterError, match="autoTune: must be true or false"):
        ApproxPrefixCacheProducer.from_parameters("p", {"autoTune": "yes"})
    with pytest.raises(ParameterError, match="did you mean 'lruCapacityPerServer'"):
        ApproxPrefixCacheProducer.from_parameters("p", {"lruCapacityPerSever": 5})
    with pytest.raises(ParameterError, match="blockSize"):  # legacy name: scorer form only
        ApproxPrefixCacheProducer.from_parameters("p", {"blockSize": 64})


def test_same_settings() -> None:
    a = ApproxPrefixCacheProducer("p", PrefixSettings(block_chars=32))
    assert a.same_settings(ApproxPrefixCacheProducer("p", PrefixSettings(block_chars=32)))
    assert not a.same_settings(ApproxPrefixCacheProducer("p"))
    assert not a.same_settings(object())


# -- scorer ------------------------------------------------------------------------------


def test_scorer_is_matched_over_total_blocks() -> None:
    producer = ApproxPrefixCacheProducer()
    scorer = PrefixCacheScorer()
    assert scorer.required_producer == producer.name
    prompt = "s" * BLOCK * 4
    producer.pre_request(request(prompt[: BLOCK * 2]), _result(candidate("a")))
    producer.pre_request(request(prompt), _result(candidate("b")))
    req = request(prompt)
    cands = [candidate("a"), candidate("b"), candidate("c")]
    producer.produce(req, cands)
    assert scorer.score(req, cands) == [0.5, 1.0, 0.0]


def test_scorer_without_producer_data_scores_zero() -> None:
    cands = [candidate("a"), candidate("b")]
    assert PrefixCacheScorer().score(request("x" * 500), cands) == [0.0, 0.0]
    producer = ApproxPrefixCacheProducer()
    short = request("tiny")
    producer.produce(short, cands)
    assert PrefixCacheScorer().score(short, cands) == [0.0, 0.0]


def test_scorer_reads_the_named_producer() -> None:
    scorer = PrefixCacheScorer.from_parameters("s", {"prefixMatchInfoProducerName": "fast"})
    assert isinstance(scorer, PrefixCacheScorer) and scorer.required_producer == "fast"
    req = request()
    req.plugin_data["fast"] = PrefixMatch([1, 2, 3, 4], {_key("a"): 1}, BLOCK)
    assert scorer.score(req, [candidate("a"), candidate("b")]) == [0.25, 0.0]


def test_scorer_with_producer_parameters_indexes_by_itself() -> None:
    scorer = PrefixCacheScorer.from_parameters("legacy", {"blockSize": 32, "autoTune": False})
    assert isinstance(scorer, SelfIndexingPrefixCacheScorer)
    assert scorer.settings.block_chars == 32 and scorer.required_producer == "legacy"
    prompt = "L" * 32 * 2
    cands = [candidate("a"), candidate("b")]
    first = request(prompt)
    scorer.produce(first, cands)
    scorer.pre_request(first, _result(cands[0]))
    second = request(prompt)
    scorer.produce(second, cands)
    assert scorer.score(second, cands) == [1.0, 0.0]
    scorer.retain([])
    assert len(scorer.producer.index) == 0


def test_scorer_parameter_conflicts() -> None:
    with pytest.raises(ParameterError, match="not both"):
        PrefixCacheScorer.from_parameters(
            "s", {"prefixMatchInfoProducerName": "p", "blockSizeTokens": 16}
        )
    with pytest.raises(ParameterError, match="conflicts with 'blockSizeTokens'"):
        PrefixCacheScorer.from_parameters("s", {"blockSizeTokens": 16, "blockSize": 64})
    with pytest.raises(ParameterError, match="did you mean 'prefixMatchInfoProducerName'"):
        PrefixCacheScorer.from_parameters("s", {"prefixMatchInfoProducer": "p"})
