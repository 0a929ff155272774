"""Request generators: what a benchmark sends, independent of how fast it is sent."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import orjson

_WORDS = tuple(
    [
        "inference",
        "routing",
        "cache",
        "prefix",
        "token",
        "model",
        "server",
        "queue",
        "latency",
        "batch",
        "decode",
        "prefill",
        "gateway",
        "envoy",
        "picker",
        "scheduler",
        "adapter",
        "workload",
        "priority",
        "context",
        "question",
        "answer",
        "system",
        "user",
        "assistant",
        "policy",
        "budget",
        "window",
        "memory",
        "block",
        "hash",
        "score",
        "weight",
        "pool",
    ]
)


def text_of_tokens(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of filler text (one word ≈ one token for our tokenisers)."""
    return " ".join(rng.choice(_WORDS) for _ in range(tokens))


@dataclass(frozen=True, slots=True)
class RequestSpec:
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    group: str = ""  # the shared-prefix group or conversation this request belongs to
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    criticality: int | None = None  # sent in X-Workload-Context


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What to send. `kind`: shared-prefix | multi-turn | random."""

    kind: str = "shared-prefix"
    model: str = "sim-model"
    groups: int = 8  # prefix groups (shared-prefix) or concurrent conversations (multi-turn)
    prefix_tokens: int = 1000  # shared system prompt length
    question_tokens: int = 50  # per-request unique part
    max_tokens: int = 32
    # vLLM stops at its end-of-sequence token unless told not to: with it set, every request
    # decodes exactly max_tokens (a tiny test model may otherwise end after one token).
    ignore_eos: bool = False
    turns: int = 5  # multi-turn: turns per conversation before it starts over
    loras: tuple[str, ...] = ()  # adapters to spread requests over ('' = base model)
    criticality_mix: tuple[tuple[int, float], ...] = ()  # (criticality, weight)
    workload_ids: int = 4  # distinct workload ids when criticality_mix is set
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_fraction: float = 1.0  # share of requests that carry the SLO headers
    prefix_skew: float = 0.0  # Zipf exponent of group popularity; 0 = uniform
    stream: bool = True
    seed: int = 0  # request order, questions, headers
    prefix_seed: int = 0  # the shared prefixes: keep it fixed so runs share warm caches

    def __post_init__(self) -> None:
        if self.kind not in ("shared-prefix", "multi-turn", "random"):
            raise ValueError(f"unknown workload kind {self.kind!r}")
        if self.groups < 1 or self.max_tokens < 1:
            raise ValueError("groups and max_tokens must be at least 1")
        if not 0.0 <= self.slo_fraction <= 1.0:
            raise ValueError("slo_fraction must be between 0 and 1")
        if self.prefix_skew < 0:
            raise ValueError("prefix_skew must be >= 0")


def generate(spec: WorkloadSpec) -> Iterator[RequestSpec]:
    """An endless, reproducible stream of requests for `spec`."""
    prefix_rng = random.Random(spec.prefix_seed)
    prefixes = [
        f"[group {g}] " + text_of_tokens(prefix_rng, spec.prefix_tokens) for g in range(spec.groups)
    ]
    rng = random.Random(spec.seed)
    conversations: list[list[dict[str, str]]] = [[] for _ in range(spec.groups)]
    # Group g is drawn with weight 1/(g+1)^skew: with skew 1 the first group is as
    # popular as the next two together, so one prefix can need several servers.
    popularity = [1.0 / (g + 1) ** spec.prefix_skew for g in range(spec.groups)]
    all_groups = range(spec.groups)
    while True:
        group = (
            rng.choices(all_groups, popularity)[0]
            if spec.prefix_skew
            else rng.randrange(spec.groups)
        )
        question = text_of_tokens(rng, spec.question_tokens)
        model = spec.model
        if spec.loras:
            model = rng.choice(spec.loras) or spec.model
        headers = {"content-type": "application/json"}
        criticality = None
        if spec.criticality_mix:
            levels, weights = zip(*spec.criticality_mix, strict=True)
            criticality = rng.choices(levels, weights)[0]
            workload = f"workload-{rng.randrange(spec.workload_ids)}"
            headers["x-workload-context"] = orjson.dumps(
                {"workload_id": workload, "criticality": criticality}
            ).decode()
        with_slo = spec.slo_fraction >= 1.0 or rng.random() < spec.slo_fraction
        slo_ttft = spec.slo_ttft_ms if with_slo else None
        slo_tpot = spec.slo_tpot_ms if with_slo else None
        if slo_ttft is not None:
            headers["x-slo-ttft-ms"] = f"{slo_ttft:g}"
        if slo_tpot is not None:
            headers["x-slo-tpot-ms"] = f"{slo_tpot:g}"
        document: dict[str, object] = {"model": model, "max_tokens": spec.max_tokens}
        if spec.ignore_eos:
            document["ignore_eos"] = True
        if spec.stream:
            document["stream"] = True
            document["stream_options"] = {"include_usage": True}
        if spec.kind == "multi-turn":
            history = conversations[group]
            if len(history) >= 2 * spec.turns:
                history.clear()
            if not history:
                history.append({"role": "system", "content": prefixes[group]})
            history.append({"role": "user", "content": question})
            document["messages"] = list(history)
            # The next turn sees a plausible answer in the history, as a real chat would.
            history.append({"role": "assistant", "content": text_of_tokens(rng, spec.max_tokens)})
            path = "/v1/chat/completions"
        else:
            prefix = prefixes[group] if spec.kind == "shared-prefix" else ""
            document["prompt"] = f"{prefix}\n{question}"
            path = "/v1/completions"
        yield RequestSpec(
            path=path,
            body=orjson.dumps(document),
            headers=headers,
            group=f"g{group}",
            slo_ttft_ms=slo_ttft,
            slo_tpot_ms=slo_tpot,
            criticality=criticality,
        )


def mix(parts: Sequence[tuple[WorkloadSpec, float]], seed: int = 0) -> Iterator[RequestSpec]:
    """Requests drawn from several workloads by weight, e.g. an interactive class with a
    tight objective and a batch class with a loose one. Each part keeps its own stream
    (its prefixes, its order), so a part's requests are the same whatever it is mixed
    with; `seed` only decides which part sends next."""
    if not parts or any(weight <= 0 for _, weight in parts):
        raise ValueError("mix needs at least one part, every weight > 0")
    streams = [generate(spec) for spec, _ in parts]
    weights = [weight for _, weight in parts]
    rng = random.Random(seed)
    while True:
        yield next(rng.choices(streams, weights)[0])
