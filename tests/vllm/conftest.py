"""Two real vLLM servers shared by the tests of this package (started once: ~1 min).

They run the tiny model `scripts/vllm-setup` builds, with a 128-block KV cache (prompts of
a few hundred tokens evict), at most two running requests each (a third waits: queue
metrics), both LoRA adapters, and KV events published to one collector socket. Without
the venv or the model the tests that need servers skip, naming the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from tests.support import vllm

SETTINGS = vllm.VllmSettings(
    kv_cache_bytes=4 * 2**20,  # 128 blocks of 32 tokens
    max_model_len=1024,
    max_num_seqs=2,
    enable_lora=True,
)


@dataclass(frozen=True, slots=True)
class VllmPool:
    servers: list[vllm.VllmServer]
    settings: vllm.VllmSettings
    events: vllm.KvEventCollector


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def pool() -> AsyncIterator[VllmPool]:
    reason = vllm.missing_reason()
    if reason is not None:
        pytest.skip(f"needs a real vLLM: {reason}")
    collector = vllm.KvEventCollector()
    settings = dataclasses.replace(SETTINGS, kv_events_collector=collector.endpoint)
    try:
        async with vllm.vllm_servers(2, settings) as servers:
            for server in servers:
                await vllm.first_events(collector, server)
            yield VllmPool(servers, settings, collector)
    finally:
        collector.close()
