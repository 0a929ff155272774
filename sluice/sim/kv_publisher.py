"""The simulator's KV-cache events: what its block cache stores, evicts and clears, published
over ZMQ in vLLM's frames, so precise prefix routing runs without vLLM.

Configured like vLLM (`--kv-events-config`, the same JSON keys):

    {"enable_kv_cache_events": true, "publisher": "zmq",
     "endpoint": "tcp://*:5557", "topic": "kv@127.0.0.1:8000@sim-model"}

As vLLM, the publisher *binds* when the endpoint has `*` or `::` or is `ipc://`, otherwise
it *connects* (to a picker's collector socket). The simulator also takes `"bind": true`
(not a vLLM key), to bind one specific address such as a loopback alias in tests. The
topic defaults to `kv@<host>:<port>@<model>`, the server's own address, which is what the picker's
collector mode matches. `--kv-events-encoding array` sends the tag-first arrays of vLLM
releases before mid 2026 instead of maps.

Events of one loop iteration go out as one batch (one message, sequence numbers from 0).
A `BlockStored` carries the blocks' token ids: the real ids when the server has a
tokenizer (`--tokenizer`, the same directory the picker's precise producer is given, so
both tokenize a prompt identically) or the prompt came as ids; otherwise stand-in ids
(one per 4 characters, `tokens.pseudo_token_ids`) that exercise the event path but that
no picker tokenizer reproduces. Extra keys follow vLLM: the adapter name on every block,
the `cache_salt` on a sequence's first block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import zmq

from epp.datalayer import kv_events
from sluice.sim import engine

ENCODINGS: Final = ("map", "array")
DEFAULT_ENDPOINT: Final = "tcp://*:5557"
_KEYS: Final = ("enable_kv_cache_events", "publisher", "endpoint", "topic", "bind")


@dataclass(frozen=True, slots=True)
class KvEventsConfig:
    endpoint: str = DEFAULT_ENDPOINT
    topic: str = ""  # empty: kv@<host>:<port>@<model>
    encoding: str = "map"
    bind: bool = False  # bind whatever the endpoint looks like (the simulator's own key)

    @property
    def binds(self) -> bool:
        e = self.endpoint
        return self.bind or "*" in e or "::" in e or e.startswith("ipc://")

    @classmethod
    def parse(cls, text: str, encoding: str = "map") -> KvEventsConfig | None:
        """vLLM's `--kv-events-config` JSON; None when events are not enabled."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--kv-events-config is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ValueError(
                f"--kv-events-config: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})"
            )
        if raw.get("enable_kv_cache_events") is not True:
            return None
        if raw.get("publisher", "zmq") != "zmq":
            raise ValueError("--kv-events-config: publisher must be 'zmq'")
        endpoint = raw.get("endpoint", DEFAULT_ENDPOINT)
        topic = raw.get("topic", "")
        if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://")):
            raise ValueError(
                f"--kv-events-config: endpoint must be a tcp:// or ipc:// address, got {endpoint!r}"
            )
        if not isinstance(topic, str):
            raise ValueError("--kv-events-config: topic must be a string")
        bind = raw.get("bind", False)
        if not isinstance(bind, bool):
            raise ValueError("--kv-events-config: bind must be true or false")
        if encoding not in ENCODINGS:
            raise ValueError(f"--kv-events-encoding must be one of {', '.join(ENCODINGS)}")
        return cls(endpoint, topic, encoding, bind)

    def for_replica(self, index: int) -> KvEventsConfig:
        """Replica `index` of a fleet binds the next ports (connecting ones share one)."""
        if index == 0 or not self.binds or not self.endpoint.startswith("tcp://"):
            return self
        head, _, port = self.endpoint.rpartition(":")
        if not port.isdigit():
            return self
        return KvEventsConfig(f"{head}:{int(port) + index}", self.topic, self.encoding, self.bind)


class KvEventPublisher:
    """Publishes one server's cache events; attach with `attach(core)`."""

    def __init__(
        self,
        config: KvEventsConfig,
        *,
        topic: str,
        block_size: int,
        lora_ids: Mapping[str, int],
    ) -> None:
        self.config = config
        self.topic = config.topic or topic
        self._block_size = block_size
        self._lora_ids = lora_ids
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        if config.binds:
            self._socket.bind(config.endpoint)
        else:
            self._socket.connect(config.endpoint)
        self._pending: list[kv_events.KvEvent] = []
        self._sequence = 0
        self.published_batches = 0

    def attach(self, core: engine.EngineCore) -> None:
        core.on_stored = self.stored
        core.pool.on_evict = self.removed

    def stored(self, request: engine.SimRequest, positions: Sequence[int]) -> None:
        """Blocks at `positions` of the request's prompt were newly cached."""
        prompt = request.prompt
        size = self._block_size
        ids = prompt.token_ids  # the server fills them in when it publishes events
        if not ids:
            return
        runs: list[list[int]] = []
        for position in positions:
            if runs and runs[-1][-1] == position - 1:
                runs[-1].append(position)
            else:
                runs.append([position])
        lora = request.lora
        for run in runs:
            first, last = run[0], run[-1]
            extra = tuple(
                self._extra_keys(lora, prompt.cache_salt if i == 0 else None) for i in run
            )
            self._add(
                kv_events.BlockStored(
                    block_hashes=tuple(prompt.block_hashes[first : last + 1]),
                    parent_block_hash=prompt.block_hashes[first - 1] if first else None,
                    token_ids=tuple(ids[first * size : (last + 1) * size]),
                    block_size=size,
                    lora_id=self._lora_ids.get(lora) if lora else None,
                    lora_name=lora,
                    medium="GPU",
                    extra_keys=extra,
                )
            )

    def removed(self, hashes: list[int]) -> None:
        self._add(kv_events.BlockRemoved(tuple(hashes), "GPU"))

    def cleared(self) -> None:
        self._add(kv_events.AllBlocksCleared("GPU"))

    def flush(self) -> None:
        if not self._pending:
            return
        batch = kv_events.EventBatch(
            self.topic, self._sequence, time.time(), tuple(self._pending), 0
        )
        self._pending = []
        self._sequence += 1
        self.published_batches += 1
        frames = kv_events.encode(batch, tagged_arrays=self.config.encoding == "array")
        with contextlib.suppress(zmq.Again):  # full queue: dropped, as vLLM's publisher does
            self._socket.send_multipart(frames, zmq.NOBLOCK)

    def close(self) -> None:
        self.flush()
        self._socket.close(linger=0)
        self._context.term()

    @staticmethod
    def _extra_keys(lora: str | None, salt: str | None) -> tuple[object, ...] | None:
        keys = tuple(k for k in (lora, salt) if k)
        return keys or None

    def _add(self, event: kv_events.KvEvent) -> None:
        self._pending.append(event)
        if len(self._pending) > 1:
            return  # a flush is already due
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # driven without a loop (tests of the engine): send now
            self.flush()
