"""The picker's tokenizer path and the precise prefix producer and scorer."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

import orjson
import pytest

from epp import metrics
from epp.bodies import tokenizer as tokenizing
from epp.bodies.parsers import OpenAIParser, ParsedBody
from epp.config import loader
from epp.config.document import ConfigError
from epp.datalayer import kv_events
from epp.datalayer.kv_event_extractor import KvEventsExtractor
from epp.requestcontrol.interfaces import ResponseSummary
from epp.scheduling import framework
from epp.scheduling.interfaces import ProfileResult, SchedulingRequest, SchedulingResult
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.precise_prefix import (
    PrecisePrefixCacheProducer,
    PrecisePrefixCacheScorer,
)
from epp.scheduling.plugins.prefix_producer import PrefixMatch
from epp.scheduling.plugins.profile_handler import SingleProfileHandler
from tests.scheduling.builders import candidate
from tests.support import tiny_tokenizer

BLOCK = 16
CONTEXT = (Path(__file__).resolve().parents[2] / "docs" / "data-layer.md").read_text()[:3000]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer.write(tmp_path_factory.mktemp("tok") / "tiny")


def parse(api: str, document: dict[str, object]) -> ParsedBody:
    return OpenAIParser().parse(f"/v1/{api}", orjson.dumps(document))


def completion(prompt: object, model: str = "tiny", **extra: object) -> ParsedBody:
    return parse("completions", {"model": model, "prompt": prompt, **extra})


def chat(*turns: tuple[str, str], model: str = "tiny", **extra: object) -> ParsedBody:
    messages = [{"role": r, "content": c} for r, c in turns]
    return parse("chat/completions", {"model": model, "messages": messages, **extra})


# ---- tokenizer ----------------------------------------------------------------------------


def test_text_prompts_start_with_bos_and_chat_goes_through_the_template(tok_dir: Path) -> None:
    pool = tokenizing.TokenizerPool({"tiny": tok_dir})
    tok = pool.tokenizer("tiny")
    assert tok is not None
    bos = 0  # "<s>" is the first special token
    text_ids = list(pool.token_ids_now(tok, completion("The picker routes requests")) or [])
    assert text_ids[0] == bos and text_ids.count(bos) == 1
    chat_ids = list(pool.token_ids_now(tok, chat(("user", "The picker routes requests"))) or [])
    rendered = "<s><|user|>\nThe picker routes requests</s>\n<|assistant|>\n"
    assert tok.render_chat([{"role": "user", "content": "The picker routes requests"}]) == rendered
    # The template writes BOS itself, so encoding adds none: exactly one, first.
    assert chat_ids[0] == bos and chat_ids.count(bos) == 1
    assert chat_ids == list(tok.encode_text(rendered, add_special_tokens=False))
    no_prompt = chat(("user", "hi"), add_generation_prompt=False)
    assert list(pool.token_ids_now(tok, no_prompt) or [])[-3:] != chat_ids[-3:]


def test_ids_given_by_the_client_are_taken_and_batches_are_not_tokenized(tok_dir: Path) -> None:
    tok = tokenizing.load(tok_dir)
    pool = tokenizing.TokenizerPool(loaded={"tiny": tok})
    assert list(pool.token_ids_now(tok, completion([5, 6, 7])) or []) == [5, 6, 7]
    assert pool.token_ids_now(tok, completion(["one", "two"])) is None
    plain = pool.token_ids_now(tok, completion("x", add_special_tokens=False))
    assert plain is not None and plain[0] != 0


def test_add_bos_token_adds_bos_when_the_post_processor_does_not(tmp_path: Path) -> None:
    directory = tiny_tokenizer.write(tmp_path / "t", add_bos_token=True)
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    tok = tokenizing.ModelTokenizer(directory)
    assert tok.encode_text("hello")[0] == 0


def test_long_prompts_are_tokenized_on_a_thread_and_cached(tok_dir: Path) -> None:
    threads: list[str] = []

    class Recording(tokenizing.ModelTokenizer):
        def encode_text(self, text: str, add_special_tokens: bool = True) -> tokenizing.TokenIds:
            threads.append(threading.current_thread().name)
            return super().encode_text(text, add_special_tokens)

    tok = Recording(tok_dir)
    pool = tokenizing.TokenizerPool(loaded={"tiny": tok}, inline_chars=100)

    async def run() -> None:
        long_body = completion(CONTEXT)
        first = await pool.token_ids(tok, long_body)
        assert threads and threads[-1].startswith("tokenizer")
        again = await pool.token_ids(tok, long_body)
        assert again is first and len(threads) == 1  # cached: not encoded again
        await pool.token_ids(tok, completion("short"))
        assert threads[-1] == threading.current_thread().name  # short: on the loop

    asyncio.run(run())


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({}, "no tokenizer.json"),
        ({"tokenizer.json": "{"}, "tokenizer.json: cannot load"),
    ],
)
def test_unusable_tokenizer_directories_say_why(
    tmp_path: Path, files: dict[str, str], error: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(tokenizing.TokenizerError, match=error):
        tokenizing.ModelTokenizer(tmp_path)


# ---- producer and scorer ------------------------------------------------------------------


def producer(
    tok_dir: Path, **params: object
) -> tuple[PrecisePrefixCacheProducer, KvEventsExtractor]:
    extractor = KvEventsExtractor()
    made = PrecisePrefixCacheProducer.from_parameters(
        "precise-prefix-cache-producer", {"tokenizers": {"tiny": str(tok_dir)}, **params}
    )
    made.bind(lambda name, kind: extractor)
    return made, extractor


def cache_on(extractor: KvEventsExtractor, name: str, ids: list[int], **fields: object) -> None:
    """What a server announces after serving `ids`: its whole blocks, stored."""
    whole = len(ids) // BLOCK * BLOCK
    event = kv_events.BlockStored(
        tuple(range(1000, 1000 + whole // BLOCK)),
        None,
        tuple(ids[:whole]),
        BLOCK,
        **fields,  # type: ignore[arg-type]
    )
    target = candidate(name).endpoint
    extractor.index.apply(target.key, event, 10_000)


def request_for(body: ParsedBody, salt: str = "") -> SchedulingRequest:
    return SchedulingRequest("r", body.model, body.prompt_text, cache_salt=salt, body=body)


def test_the_server_that_cached_the_prefix_scores_highest(tok_dir: Path) -> None:
    made, extractor = producer(tok_dir)
    tok = tokenizing.load(tok_dir)
    shared = list(tok.encode_text(CONTEXT))
    cache_on(extractor, "b", shared)
    body = completion(CONTEXT + " and a question of its own")
    cands = [candidate("a"), candidate("b"), candidate("c")]
    req = request_for(body)
    made.produce(req, cands)
    match = req.plugin_data[made.name]
    assert isinstance(match, PrefixMatch)
    b = cands[1].endpoint.key
    assert set(match.matched_blocks) == {b}
    # The shared text's blocks minus the last, whose tokens the question's first word
    # changes (BPE merges across the join), or all of them.
    assert match.matched_blocks[b] >= len(shared) // BLOCK - 1
    scores = PrecisePrefixCacheScorer().score(req, cands)
    assert scores[0] == scores[2] == 0.0
    assert scores[1] == pytest.approx(match.matched_blocks[b] / match.total_blocks)
    capped = PrecisePrefixCacheScorer(min_blocks_for_full_score=10 * match.total_blocks)
    assert capped.score(req, cands)[1] == pytest.approx(scores[1] / 10)


def test_chat_requests_match_what_a_chat_cached(tok_dir: Path) -> None:
    made, extractor = producer(tok_dir)
    first = chat(("system", CONTEXT), ("user", "first question"))
    ids = list(made.tokenizers.token_ids_now(tokenizing.load(tok_dir), first) or [])
    cache_on(extractor, "a", ids)
    follow_up = chat(
        ("system", CONTEXT), ("user", "first question"), ("assistant", "answer"), ("user", "second")
    )
    req = request_for(follow_up)
    made.produce(req, [candidate("a"), candidate("b")])
    match = req.plugin_data[made.name]
    assert isinstance(match, PrefixMatch)
    assert match.matched_blocks[candidate("a").endpoint.key] >= len(ids) // BLOCK - 1


def test_lora_adapters_and_salts_only_match_their_own_blocks(tok_dir: Path) -> None:
    made, extractor = producer(tok_dir, loraAdapters={"tenant-lora": "tiny"})
    ids = list(tokenizing.load(tok_dir).encode_text(CONTEXT))
    cache_on(extractor, "a", ids, lora_id=1, lora_name="tenant-lora")
    cache_on(extractor, "b", ids, extra_keys=(("s1",),))
    a, b = candidate("a"), candidate("b")

    def matched(model: str, salt: str = "") -> set[str]:
        req = request_for(completion(CONTEXT, model=model), salt)
        made.produce(req, [a, b])
        match = req.plugin_data[made.name]
        assert isinstance(match, PrefixMatch)
        return {str(k) for k in match.matched_blocks}

    assert matched("tenant-lora") == {str(a.endpoint.key)}
    assert matched("tiny", salt="s1") == {str(b.endpoint.key)}
    assert matched("tiny", salt="s2") == set()
    assert matched("tiny") == set()


def test_a_model_without_a_tokenizer_uses_the_approximate_index(
    tok_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made, _ = producer(tok_dir)
    counted = metrics.precise_prefix_approximate_total.labels(made.name)
    before = counted._value.get()
    cands = [candidate("a"), candidate("b")]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            req = request_for(completion(CONTEXT, model="other"))
            made.produce(req, cands)
            result = SchedulingResult({"p": ProfileResult((cands[1],))}, "p")
            made.pre_request(req, result)
    assert counted._value.get() == before + 3
    lines = [r.message for r in caplog.records if "'other'" in r.message]
    assert len(lines) == 1 and "no tokenizer configured" in lines[0]
    # The approximate index learned from routing: the third request matched b.
    match = req.plugin_data[made.name]
    assert isinstance(match, PrefixMatch) and set(match.matched_blocks) == {cands[1].endpoint.key}


async def test_the_scheduler_prepares_before_it_schedules(tok_dir: Path) -> None:
    made, extractor = producer(tok_dir, inlineTokenizeChars=0)
    ids = list(tokenizing.load(tok_dir).encode_text(CONTEXT))
    cache_on(extractor, "b", ids)
    profile = framework.SchedulingProfile(
        "p",
        picker=MaxScorePicker(),
        scorers=[(PrecisePrefixCacheScorer(), 1.0)],
        producers=[made],
    )
    scheduler = framework.Scheduler({"p": profile}, SingleProfileHandler())
    assert scheduler.preparers == (made,)
    req = request_for(completion(CONTEXT))
    await scheduler.prepare(req)
    assert made.name + "/token-ids" in req.plugin_data
    result = scheduler.schedule(req, [candidate("a"), candidate("b"), candidate("c")])
    assert result.primary is not None
    assert result.primary.targets[0].endpoint.key == candidate("b").endpoint.key


def test_config_errors_name_the_parameter(tmp_path: Path, tok_dir: Path) -> None:
    def load(params: str) -> None:
        loader.load_config(f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{type: kv-events-data-source}}
- {{type: kv-events-extractor}}
- {{type: precise-prefix-cache-producer, parameters: {params}}}
- {{type: precise-prefix-cache-scorer}}
data:
  sources:
  - {{pluginRef: kv-events-data-source, extractors: [{{pluginRef: kv-events-extractor}}]}}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: precise-prefix-cache-scorer}}]
""")

    load(f"{{tokenizers: {{tiny: '{tok_dir}'}}}}")
    # Tokenizers load with their model's first request (a volume may not be there yet).
    load(f"{{tokenizers: {{tiny: '{tmp_path / 'missing'}'}}}}")
    with pytest.raises(ConfigError, match="adapter 'x' names base model 'nope'"):
        load(f"{{tokenizers: {{tiny: '{tok_dir}'}}, loraAdapters: {{x: nope}}}}")
    typo = r"tokenizer \(.*\): unknown parameter \(did you mean 'tokenizers'\?\)"
    with pytest.raises(ConfigError, match=typo):
        load("{tokenizer: {}}")


def test_a_tokenizer_that_cannot_be_loaded_falls_back_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = PrecisePrefixCacheProducer.from_parameters(
        "p", {"tokenizers": {"tiny": str(tmp_path / "not-mounted")}}
    )
    extractor = KvEventsExtractor()
    made.bind(lambda name, kind: extractor)
    with caplog.at_level(logging.WARNING):
        req = request_for(completion(CONTEXT))
        asyncio.run(made.prepare(req))
        made.produce(req, [candidate("a")])
    assert req.plugin_data.get("p/approximate") is True
    assert any(
        "cannot be loaded" in r.message and "not a directory" in r.message for r in caplog.records
    )


def routed(
    made: PrecisePrefixCacheProducer, body: ParsedBody, to: str, *names: str
) -> tuple[SchedulingRequest, dict[str, int]]:
    """Produce for a request among servers `names`, route it to `to`; the request and its
    match by server."""
    req = request_for(body)
    made.produce(req, [candidate(n) for n in names])
    match = req.plugin_data[made.name]
    assert isinstance(match, PrefixMatch)
    made.pre_request(req, SchedulingResult({"p": ProfileResult((candidate(to),))}, "p"))
    return req, {str(k): v for k, v in match.matched_blocks.items()}


def ended(made: PrecisePrefixCacheProducer, req: SchedulingRequest, at: str) -> None:
    summary = ResponseSummary(200, True, True, None, None, None, 1.0)
    made.response_complete(req, candidate(at), summary)


def test_a_prompt_in_flight_counts_as_held_by_its_server_until_the_response_ends(
    tok_dir: Path,
) -> None:
    # Events come after the server computed the prompt (under load, seconds after it was
    # routed): until then the next request of the same prefix must still find it on b,
    # not be sent wherever load says, for a second full prefill.
    made, extractor = producer(tok_dir)
    ids = list(tokenizing.load(tok_dir).encode_text(CONTEXT))
    whole = len(ids) // BLOCK
    a, b, c = (str(candidate(n).endpoint.key) for n in "abc")
    first, matched = routed(made, completion(CONTEXT + " first question"), "b", "a", "b", "c")
    assert matched == {}  # nobody had it
    second, matched = routed(made, completion(CONTEXT + " second question"), "b", "a", "b", "c")
    assert set(matched) == {b} and matched[b] >= whole - 1
    # The first request ends; the second still holds the prompt on b.
    ended(made, first, "b")
    third, matched = routed(made, completion(CONTEXT + " third question"), "b", "a", "b", "c")
    assert set(matched) == {b} and matched[b] >= whole - 1
    ended(made, second, "b")
    ended(made, third, "b")
    assert made.in_flight is not None and len(made.in_flight) == 0
    # Nothing in flight, nothing announced: held nowhere.
    _, matched = routed(made, completion(CONTEXT + " later"), "a", "a", "b", "c")
    assert matched == {}
    # Announced blocks and a request in flight: the longer of the two counts.
    cache_on(extractor, "c", ids[: BLOCK * 4])
    _, matched = routed(made, completion(CONTEXT), "c", "a", "b", "c")
    assert matched[c] == 4 and matched[a] >= whole - 1 and b not in matched


def test_in_flight_prefixes_can_be_switched_off_and_forget_servers_that_left(
    tok_dir: Path,
) -> None:
    off, _ = producer(tok_dir, inFlightPrefixes=False)
    routed(off, completion(CONTEXT + " one"), "b", "a", "b")
    assert routed(off, completion(CONTEXT + " two"), "b", "a", "b")[1] == {}
    on, _ = producer(tok_dir)
    first, _ = routed(on, completion(CONTEXT + " one"), "b", "a", "b")
    on.retain({candidate("a").endpoint.key})  # b left the pool
    assert routed(on, completion(CONTEXT + " two"), "a", "a", "b")[1] == {}
    ended(on, first, "b")  # its server left meanwhile: nothing to give back
    assert on.in_flight is not None and len(on.in_flight) == 1  # the second, on a


def test_the_lifecycle_ends_in_flight_prompts() -> None:
    config = loader.load_config(
        (
            Path(__file__).resolve().parents[2] / "docs" / "configs" / "precise-prefix.yaml"
        ).read_text()
    )
    names = [p.name for p in config.lifecycle.response_complete_plugins]
    assert "precise-prefix-cache-producer" in names
