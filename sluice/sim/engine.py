"""The simulated inference engine: a vLLM-like scheduler whose steps take modelled time.

`EngineCore` is a plain state machine with no I/O and no clock of its own: `begin_step(now)`
decides what the next forward pass does and how long it takes, `end_step(step, now)`
applies its effects at the time it ends. Tests drive it with a fake clock; `EngineLoop`
drives it in real time (`sluice.sim.realtime`).

One step, as in vLLM's continuous batching:

1. Running sequences that are decoding each need room for one more token; when the KV
   pool is full the most recently admitted sequence is preempted (its blocks freed, it
   goes back to the head of the waiting queue and is recomputed when readmitted).
2. Waiting sequences are admitted in FIFO order while fewer than `max_num_seqs` run and
   the KV pool can hold their prompt (admission stops at the first that does not fit).
   A sequence whose LoRA adapter cannot be loaded (all `max_loras` slots busy with
   adapters that have running sequences) is skipped and keeps its place.
3. Duration: prefill of newly admitted sequences costs `ttft_ms` plus
   `prefill_ms_per_token` per *uncached* prompt token (plus `lora_load_ms` per adapter
   loaded); decoding costs `itl_ms * (1 + decode_batch_factor * (batch - 1))` for a batch
   of decoding sequences. A step can do both; its duration is the sum.
4. At the end of the step each sequence in it gains one token; finished sequences release
   their blocks, and computed prompt blocks become matchable in the prefix cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from sluice.sim import metrics_text, prefix_cache, tokens


@dataclass(frozen=True, slots=True)
class PerformanceModel:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 0  # per-step budget of uncached prompt tokens; 0 = none
    block_size: int = 16
    kv_cache_blocks: int = 8192
    enable_prefix_caching: bool = True
    ttft_ms: float = 20.0
    prefill_ms_per_token: float = 0.1
    itl_ms: float = 10.0
    decode_batch_factor: float = 0.02
    max_loras: int = 1
    lora_load_ms: float = 0.0

    def scaled(self, speed: float) -> PerformanceModel:
        """The same server `speed` times as fast (2.0: every modelled time halves)."""
        return dataclasses.replace(
            self,
            ttft_ms=self.ttft_ms / speed,
            prefill_ms_per_token=self.prefill_ms_per_token / speed,
            itl_ms=self.itl_ms / speed,
            lora_load_ms=self.lora_load_ms / speed,
        )

    def blocks_for(self, num_tokens: int) -> int:
        return max(1, -(-num_tokens // self.block_size))

    def prefill_ms(self, uncached_tokens: int) -> float:
        return self.ttft_ms + self.prefill_ms_per_token * uncached_tokens

    def decode_ms(self, batch: int) -> float:
        return self.itl_ms * (1.0 + self.decode_batch_factor * (batch - 1))


class Phase(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class SimRequest:
    """One sequence: what the client asked for, and where the engine has got to with it.

    `on_progress` is called (synchronously, from the engine) whenever `generated` grows
    or the request finishes; the HTTP layer uses it to wake the response writer.
    """

    __slots__ = (
        "arrival_s",
        "cached_tokens",
        "finish_reason",
        "finished_s",
        "first_token_s",
        "generated",
        "last_token_s",
        "lease",
        "limit_reason",
        "lora",
        "matched_blocks",
        "max_tokens",
        "needs_prefill",
        "on_progress",
        "phase",
        "preemptions",
        "prompt",
        "request_id",
        "uncached_tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt: tokens.Prompt,
        max_tokens: int,
        *,
        lora: str | None = None,
        limit_reason: str = "length",
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        self.request_id = request_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.lora = lora
        self.limit_reason = limit_reason  # finish_reason when max_tokens is reached
        self.on_progress = on_progress
        self.phase = Phase.WAITING
        self.generated = 0
        self.cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.uncached_tokens = 0
        self.matched_blocks = 0
        self.needs_prefill = True
        self.preemptions = 0
        self.lease: prefix_cache.BlockLease | None = None
        self.arrival_s = 0.0
        self.first_token_s: float | None = None
        self.last_token_s = 0.0
        self.finished_s: float | None = None
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.ABORTED)

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress()


@dataclass(frozen=True, slots=True)
class Step:
    prefills: tuple[SimRequest, ...]
    decodes: tuple[SimRequest, ...]
    duration_s: float  # modelled, before any time scaling
    latest_arrival_s: float  # the step cannot have started before its newest request


class EngineCore:
    def __init__(self, model: PerformanceModel, stats: metrics_text.VllmStats | None = None):
        self.model = model
        self.stats = stats if stats is not None else metrics_text.VllmStats()
        self.pool = prefix_cache.KVBlockPool(model.kv_cache_blocks)
        # Told of blocks newly cached (the KV-event publisher); evictions go through
        # `pool.on_evict`.
        self.on_stored: Callable[[SimRequest, list[int]], None] | None = None
        self._waiting: deque[SimRequest] = deque()
        self._running: list[SimRequest] = []
        self._loaded_loras: OrderedDict[str, None] = OrderedDict()  # least recent first
        self._running_per_lora: dict[str, int] = {}

    # -- what the outside sees -------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.pool.usage

    @property
    def loaded_loras(self) -> list[str]:
        return list(self._loaded_loras)

    def running_loras(self) -> list[str]:
        return sorted(name for name, n in self._running_per_lora.items() if n > 0)

    def waiting_loras(self) -> list[str]:
        return sorted({r.lora for r in self._waiting if r.lora is not None})

    def max_blocks_for(self, request: SimRequest) -> int:
        return self.model.blocks_for(request.prompt.num_tokens + request.max_tokens)

    # -- requests in and out ---------------------------------------------------------

    def add(self, request: SimRequest, now_s: float) -> None:
        if self.max_blocks_for(request) > self.pool.capacity:
            raise ValueError(
                f"request needs {self.max_blocks_for(request)} KV blocks but the cache "
                f"holds {self.pool.capacity}"
            )
        if request.lora is not None and self.model.max_loras < 1:
            raise ValueError("LoRA adapters are not enabled (max_loras is 0)")
        request.arrival_s = now_s
        request.phase = Phase.WAITING
        self._waiting.append(request)

    def abort(self, request: SimRequest, now_s: float) -> None:
        """Drop a request (client went away). Frees what it holds; no-op once done."""
        if request.phase is Phase.WAITING:
            with contextlib.suppress(ValueError):
                self._waiting.remove(request)
        elif request.phase is Phase.RUNNING:
            self._running.remove(request)
            self._release(request)
        else:
            return
        request.phase = Phase.ABORTED
        request.finish_reason = "abort"
        request.finished_s = now_s
        self.stats.request_success["abort"] += 1
        request._notify()

    # -- stepping --------------------------------------------------------------------

    def begin_step(self, now_s: float) -> Step | None:
        """Schedule the next forward pass; None when there is nothing to run."""
        preempted = self._reserve_decode_slots()
        decodes = tuple(r for r in self._running if not r.needs_prefill)
        # As in vLLM, a step that had to preempt admits nobody new.
        load_ms = 0.0 if preempted else self._admit(now_s)
        prefills = tuple(r for r in self._running if r.needs_prefill)
        if not prefills and not decodes:
            return None
        duration_ms = load_ms
        if prefills:
            duration_ms += self.model.prefill_ms(sum(r.uncached_tokens for r in prefills))
        if decodes:
            duration_ms += self.model.decode_ms(len(decodes))
        latest = max((r.arrival_s for r in prefills), default=0.0)
        return Step(prefills, decodes, duration_ms / 1000.0, latest)

    def end_step(self, step: Step, now_s: float) -> None:
        """Apply a step's effects at `now_s`, the time it ended."""
        finished = False
        for r in step.prefills:
            if r.phase is not Phase.RUNNING:
                continue
            r.needs_prefill = False
            if self.model.enable_prefix_caching and r.lease is not None:
                new = self.pool.publish(r.lease, r.prompt.block_hashes[r.matched_blocks :])
                if new and self.on_stored is not None:
                    self.on_stored(r, [r.matched_blocks + i for i in new])
            if r.first_token_s is None:
                self.stats.prompt_tokens += r.prompt.num_tokens
            finished |= self._emit_token(r, now_s)
        for r in step.decodes:
            if r.phase is Phase.RUNNING:
                finished |= self._emit_token(r, now_s)
        if finished:
            self._running = [r for r in self._running if r.phase is Phase.RUNNING]

    # -- internals -------------------------------------------------------------------

    def _emit_token(self, r: SimRequest, now_s: float) -> bool:
        r.generated += 1
        self.stats.generation_tokens += 1
        if r.first_token_s is None:
            r.first_token_s = now_s
            self.stats.ttft.observe(now_s - r.arrival_s)
        else:
            self.stats.itl.observe(now_s - r.last_token_s)
        r.last_token_s = now_s
        done = r.generated >= r.max_tokens
        if done:
            r.phase = Phase.FINISHED
            r.finish_reason = r.limit_reason
            r.finished_s = now_s
            self._release(r)
            self.stats.request_success[r.limit_reason] += 1
            self.stats.e2e.observe(now_s - r.arrival_s)
        r._notify()
        return done

    def _release(self, r: SimRequest) -> None:
        if r.lease is not None:
            self.pool.release(r.lease)
            r.lease = None
        if r.lora is not None:
            self._running_per_lora[r.lora] -= 1

    def _reserve_decode_slots(self) -> bool:
        """Give each decoding sequence room for its next token, preempting the newest
        running sequences while the pool is full; True if anything was preempted."""
        preempted = False
        i = 0
        while i < len(self._running):
            r = self._running[i]
            if r.needs_prefill or r.lease is None:
                i += 1
                continue
            missing = self.model.blocks_for(r.prompt.num_tokens + r.generated) - r.lease.num_blocks
            if missing <= 0 or self.pool.grow(r.lease, missing):
                i += 1
                continue
            victim = self._running.pop()
            self._preempt(victim)
            preempted = True
            # If the victim was r itself, the loop ends: nothing after it remains.
        return preempted

    def _preempt(self, r: SimRequest) -> None:
        self._release(r)
        r.phase = Phase.WAITING
        r.needs_prefill = True
        r.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.appendleft(r)

    def _lora_can_run(self, name: str) -> bool:
        if name in self._loaded_loras or len(self._loaded_loras) < self.model.max_loras:
            return True
        return any(self._running_per_lora.get(n, 0) == 0 for n in self._loaded_loras)

    def _lora_load(self, name: str) -> bool:
        """Make `name` resident (evicting the least recent idle adapter if needed);
        True when that meant loading it."""
        if name in self._loaded_loras:
            self._loaded_loras.move_to_end(name)
            return False
        if len(self._loaded_loras) >= self.model.max_loras:
            idle = next(n for n in self._loaded_loras if self._running_per_lora.get(n, 0) == 0)
            del self._loaded_loras[idle]
        self._loaded_loras[name] = None
        return True

    def _admit(self, now_s: float) -> float:
        """Move waiting requests into the batch; returns LoRA load time in ms."""
        model = self.model
        budget = model.max_num_batched_tokens or float("inf")
        skipped: list[SimRequest] = []
        admitted = 0
        load_ms = 0.0
        while self._waiting and len(self._running) < model.max_num_seqs:
            r = self._waiting[0]
            if r.lora is not None and not self._lora_can_run(r.lora):
                skipped.append(self._waiting.popleft())
                continue
            num_tokens = r.prompt.num_tokens + r.generated
            hashes = r.prompt.block_hashes
            matched = self.pool.match(hashes) if model.enable_prefix_caching else 0
            if matched * model.block_size >= num_tokens:  # always compute the last token
                matched = (num_tokens - 1) // model.block_size
            uncached = num_tokens - matched * model.block_size
            if admitted and uncached > budget:
                break
            lease = self.pool.allocate(hashes[:matched], model.blocks_for(num_tokens) - matched)
            if lease is None:
                break
            self._waiting.popleft()
            if r.lora is not None:
                if self._lora_load(r.lora):
                    load_ms += model.lora_load_ms
                self._running_per_lora[r.lora] = self._running_per_lora.get(r.lora, 0) + 1
            r.lease = lease
            r.matched_blocks = matched
            r.uncached_tokens = uncached
            r.phase = Phase.RUNNING
            if model.enable_prefix_caching:
                self.stats.prefix_cache_queries += num_tokens
                self.stats.prefix_cache_hits += matched * model.block_size
            if r.cached_tokens is None:
                r.cached_tokens = matched * model.block_size
                self.stats.queue_time.observe(now_s - r.arrival_s)
            self._running.append(r)
            admitted += 1
            budget -= uncached
        self._waiting.extendleft(reversed(skipped))
        return load_ms
