"""The simulator's KV-cache events: stores (with real token ids, adapter and salt),
evictions and clears, in both encodings, with the flag checked like vLLM's."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
import zmq

from epp.bodies import tokenizer as tokenizing
from epp.datalayer import kv_events
from sluice.sim import cli, config, engine, kv_publisher
from sluice.sim.server import SimulatedServer
from tests.support import tiny_tokenizer

BLOCK = 16
TEXT = (Path(__file__).resolve().parents[2] / "docs" / "data-layer.md").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_tokenizer.write(tmp_path_factory.mktemp("tok") / "tiny")


class Collector:
    """A bound SUB socket the simulator connects to, as the picker's collector mode."""

    def __init__(self) -> None:
        self.port = free_port()
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.bind(f"tcp://127.0.0.1:{self.port}")
        self.batches: list[kv_events.EventBatch] = []

    def events(self) -> list[kv_events.KvEvent]:
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.batches.append(kv_events.decode(frames))
        return [e for b in self.batches for e in b.events]

    async def wait(self, kind: type, count: int = 1) -> list[kv_events.KvEvent]:
        deadline = time.monotonic() + 10
        while len(found := [e for e in self.events() if isinstance(e, kind)]) < count:
            assert time.monotonic() < deadline, f"no {kind.__name__} event arrived"
            await asyncio.sleep(0.01)
        return found

    def close(self) -> None:
        self.context.destroy(linger=0)


async def post(url: str, path: str, body: dict[str, object] | None = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + path, data=orjson.dumps(body) if body is not None else b"") as response,
    ):
        await response.read()
        return response.status


async def settled(server: SimulatedServer, collector: Collector) -> None:
    """Publish until the connection is up: ZMQ drops what a publisher sends before it."""
    deadline = time.monotonic() + 10
    while not collector.events():
        assert time.monotonic() < deadline, "the simulator's events never arrived"
        assert await post(server.url, "/reset_prefix_cache") == 200  # AllBlocksCleared
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("encoding", ["map", "array"])
async def test_stores_carry_the_tokenizers_ids_adapter_and_salt(
    tok_dir: Path, encoding: str
) -> None:
    collector = Collector()
    cfg = config.SimConfig(
        model="tiny",
        tokenizer=str(tok_dir),
        lora_modules=("tenant",),
        performance=engine.PerformanceModel(block_size=BLOCK, kv_cache_blocks=256, max_loras=1),
        time_scale=0.01,
        default_max_tokens=1,
        kv_events=kv_publisher.KvEventsConfig(
            f"tcp://127.0.0.1:{collector.port}", encoding=encoding
        ),
    )
    try:
        async with SimulatedServer(cfg) as server:
            await settled(server, collector)
            prompt = TEXT[:600]
            body = {"model": "tenant", "prompt": prompt, "cache_salt": "s1"}
            assert await post(server.url, "/v1/completions", body) == 200
            (stored,) = await collector.wait(kv_events.BlockStored)
            assert isinstance(stored, kv_events.BlockStored)
            ids = list(tokenizing.load(tok_dir).encode_text(prompt))
            whole = len(ids) // BLOCK
            assert stored.token_ids == tuple(ids[: whole * BLOCK])
            assert len(stored.block_hashes) == whole and stored.parent_block_hash is None
            assert (stored.lora_name, stored.lora_id, stored.medium) == ("tenant", 1, "GPU")
            assert stored.extra_keys is not None
            assert stored.extra_keys[0] == ("tenant", "s1") and stored.extra_keys[1] == ("tenant",)
            assert collector.batches[-1].topic == f"kv@{server.address}@tiny"
            sequences = [b.sequence for b in collector.batches]
            assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    finally:
        collector.close()


async def test_evictions_and_clears_are_published() -> None:
    collector = Collector()
    cfg = config.SimConfig(
        performance=engine.PerformanceModel(block_size=BLOCK, kv_cache_blocks=16),
        time_scale=0.01,
        default_max_tokens=1,
        kv_events=kv_publisher.KvEventsConfig(f"tcp://127.0.0.1:{collector.port}"),
    )
    try:
        async with SimulatedServer(cfg) as server:
            await settled(server, collector)
            for i in range(4):  # 10 blocks each in a 16-block cache: evictions
                body = {"model": "sim-model", "prompt": TEXT[i * 640 : (i + 1) * 640]}
                assert await post(server.url, "/v1/completions", body) == 200
            stored = await collector.wait(kv_events.BlockStored, 4)
            removed = await collector.wait(kv_events.BlockRemoved)
            evicted = {h for e in removed for h in e.block_hashes}  # type: ignore[attr-defined]
            assert evicted <= {h for e in stored for h in e.block_hashes}  # type: ignore[attr-defined]
            # Without a tokenizer the ids are stand-ins, one per 4 characters.
            assert all(len(e.token_ids) == len(e.block_hashes) * BLOCK for e in stored)  # type: ignore[attr-defined]
            cleared = len(await collector.wait(kv_events.AllBlocksCleared))
            assert await post(server.url, "/reset_prefix_cache") == 200
            await collector.wait(kv_events.AllBlocksCleared, cleared + 1)
    finally:
        collector.close()


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        ("{", "--kv-events-config is not JSON"),
        ('{"enable_kv_cache_events": true, "publisher": "nats"}', "publisher must be 'zmq'"),
        ('{"enable_kv_cache_events": true, "endpoint": "http://x"}', "must be a tcp:// or ipc://"),
        ('{"enable_kv_cache_events": true, "topics": "x"}', "unknown key 'topics'"),
    ],
)
def test_the_flag_is_checked(flag: str, error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--kv-events-config", flag])
    assert error in capsys.readouterr().err


def test_disabled_events_and_replica_ports() -> None:
    assert kv_publisher.KvEventsConfig.parse('{"enable_kv_cache_events": false}') is None
    bound = kv_publisher.KvEventsConfig.parse('{"enable_kv_cache_events": true}')
    assert bound is not None and bound.binds and bound.endpoint == "tcp://*:5557"
    assert bound.for_replica(2).endpoint == "tcp://*:5559"
    connecting = kv_publisher.KvEventsConfig("tcp://10.0.0.1:5557")
    assert not connecting.binds and connecting.for_replica(2) == connecting
