"""What one simulated server is: served names, adapters, performance model, failures."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sluice.sim import engine, kv_publisher


@dataclass(frozen=True, slots=True)
class SimConfig:
    model: str = "sim-model"
    # Names the base model answers to (vLLM's --served-model-name); empty = (model,).
    # The first is the `model_name` label on metrics.
    served_model_names: tuple[str, ...] = ()
    lora_modules: tuple[str, ...] = ()  # adapter names
    max_model_len: int = 0  # prompt + output tokens; 0 = what the KV cache holds
    default_max_tokens: int = 128  # output length when a request sets no max_tokens
    performance: engine.PerformanceModel = field(default_factory=engine.PerformanceModel)
    time_scale: float = 1.0  # multiplies every modelled duration; 0.1 = 10x faster
    failure_rate: float = 0.0  # fraction of inference requests answered with failure_status
    failure_status: int = 503
    slow_start_s: float = 0.0  # wall seconds after start during which everything is 503
    silent_after_s: float = 0.0  # wall seconds after start when the server goes silent; 0 = never
    seed: int = 0  # failure injection randomness
    # A model directory whose tokenizer counts prompts (else 4 characters a token).
    tokenizer: str = ""
    kv_events: kv_publisher.KvEventsConfig | None = None  # publish KV-cache events

    @property
    def names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    @property
    def context_tokens(self) -> int:
        p = self.performance
        return self.max_model_len or p.kv_cache_blocks * p.block_size

    def replace(self, **changes: object) -> SimConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def problems(self) -> list[str]:
        """Everything wrong with this config, each naming its flag; empty when valid."""
        p = self.performance
        out: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                out.append(message)

        need(bool(self.model), "--model must not be empty")
        need(p.max_num_seqs >= 1, "--max-num-seqs must be at least 1")
        need(p.max_num_batched_tokens >= 0, "--max-num-batched-tokens must be >= 0")
        need(p.block_size >= 1, "--block-size must be at least 1")
        need(p.kv_cache_blocks >= 1, "--kv-cache-size must be at least 1 block")
        for flag, value in (
            ("--time-to-first-token", p.ttft_ms),
            ("--prefill-time-per-token", p.prefill_ms_per_token),
            ("--inter-token-latency", p.itl_ms),
            ("--decode-batch-factor", p.decode_batch_factor),
            ("--lora-load-time", p.lora_load_ms),
            ("--slow-start", self.slow_start_s),
            ("--silent-after", self.silent_after_s),
        ):
            need(value >= 0, f"{flag} must be >= 0 (got {value})")
        need(self.time_scale > 0, f"--time-scale must be > 0 (got {self.time_scale})")
        need(
            0.0 <= self.failure_rate <= 1.0,
            f"--failure-rate must be between 0 and 1 (got {self.failure_rate})",
        )
        need(
            400 <= self.failure_status <= 599,
            f"--failure-status must be an HTTP error status 400-599 (got {self.failure_status})",
        )
        need(self.default_max_tokens >= 1, "--default-max-tokens must be at least 1")
        need(self.max_model_len >= 0, "--max-model-len must be >= 0")
        capacity = p.kv_cache_blocks * p.block_size
        need(
            self.max_model_len <= capacity,
            f"--max-model-len {self.max_model_len} is larger than the KV cache "
            f"({p.kv_cache_blocks} blocks x {p.block_size} = {capacity} tokens); "
            "raise --kv-cache-size or lower --max-model-len",
        )
        need(
            not self.lora_modules or p.max_loras >= 1,
            "--max-loras must be at least 1 when --lora-modules are given",
        )
        clash = set(self.lora_modules) & set(self.names)
        need(not clash, f"--lora-modules name(s) {sorted(clash)} clash with the served model name")
        need(
            len(set(self.lora_modules)) == len(self.lora_modules),
            "--lora-modules names must be unique",
        )
        return out
