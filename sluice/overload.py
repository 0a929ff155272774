"""`sluice demo --scenario overload`: three workloads asking more of the pool than it has.

Each workload sends open-loop (at a fixed rate, whatever the answers) through the gateway,
so the offered load really exceeds the pool's capacity:

* `critical` — objective `critical` (priority 10), criticality 5, 0.6x the capacity;
* `standard` — no objective (priority 0), criticality 3, 1.2x;
* `sheddable` — objective `sheddable` (priority -1), criticality 1, 0.8x.

With the flow-control preset the picker then serves critical requests at once, queues
standard ones (503 when they wait past the TTL) and answers sheddable ones 429 while
anything waits. The capacity is estimated from the simulators' performance model, so the
scenario overloads a pool at any `--time-scale`, size or speed.

Each workload's tally (sent, answered by status) is what its clients saw; the view puts it
beside what the picker reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import orjson

from sluice import presets
from sluice.sim import engine

# Long enough answers that a modest request rate fills the pool (less client and picker
# CPU for the same overload), short enough to turn over every few seconds.
MAX_TOKENS = 200
_PROMPT = "Summarise the overload scenario in two sentences. Request {n} of workload {name}."
_REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Workload:
    name: str  # the X-Workload-Context workload_id
    objective: str | None  # x-gateway-inference-objective; None: priority 0
    criticality: int
    capacity_share: float  # offered rate as a multiple of the pool's capacity

    def headers(self) -> dict[str, str]:
        context = orjson.dumps({"workload_id": self.name, "criticality": self.criticality})
        headers = {"content-type": "application/json", "x-workload-context": context.decode()}
        if self.objective is not None:
            headers["x-gateway-inference-objective"] = self.objective
        return headers


WORKLOADS = (
    Workload("critical", presets.CRITICAL_OBJECTIVE, 5, 0.6),
    Workload("standard", None, 3, 1.2),
    Workload("sheddable", presets.SHEDDABLE_OBJECTIVE, 1, 0.8),
)


def capacity_rps(
    replicas: int, max_num_seqs: int, speeds: Sequence[float], time_scale: float
) -> float:
    """Requests per second the simulated pool completes when every batch is full."""
    model = engine.PerformanceModel(max_num_seqs=max_num_seqs)
    prompt_tokens = len(_PROMPT) // 4 + 4
    request_ms = (
        model.prefill_ms(prompt_tokens) + MAX_TOKENS * model.decode_ms(max_num_seqs)
    ) * time_scale
    return sum(
        max_num_seqs * speeds[i % len(speeds)] * 1000.0 / request_ms for i in range(replicas)
    )


class Tally:
    """What one workload's clients saw: requests sent and how they were answered."""

    __slots__ = ("failed", "in_flight", "ok", "rejected", "sent", "unavailable")

    def __init__(self) -> None:
        self.sent = 0
        self.in_flight = 0
        self.ok = 0  # 2xx
        self.rejected = 0  # 429
        self.unavailable = 0  # 503
        self.failed = 0  # any other status, or no answer

    def count(self, status: int) -> None:
        if 200 <= status < 300:
            self.ok += 1
        elif status == 429:
            self.rejected += 1
        elif status == 503:
            self.unavailable += 1
        else:
            self.failed += 1


class OverloadScenario:
    """Drives `WORKLOADS` at `capacity_rps` times their shares until `stop()`."""

    def __init__(self, url: str, model: str, capacity_rps: float) -> None:
        self.url = url + "/v1/completions"
        self.model = model
        self.capacity_rps = capacity_rps
        self.tallies = {w.name: Tally() for w in WORKLOADS}
        self._session: aiohttp.ClientSession | None = None
        self._senders: list[asyncio.Task[None]] = []
        self._requests: set[asyncio.Task[None]] = set()

    @property
    def offered_rps(self) -> float:
        return sum(self.rate_rps(w) for w in WORKLOADS)

    def rate_rps(self, workload: Workload) -> float:
        return workload.capacity_share * self.capacity_rps

    def start(self) -> None:
        # No connection limit: an open-loop client must not queue requests itself.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S),
        )
        self._senders = [
            asyncio.create_task(self._send_at_rate(w), name=f"overload-{w.name}") for w in WORKLOADS
        ]

    async def stop(self) -> None:
        tasks = [*self._senders, *self._requests]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    async def _send_at_rate(self, workload: Workload) -> None:
        interval_s = 1.0 / self.rate_rps(workload)
        headers = workload.headers()
        tally = self.tallies[workload.name]
        next_send = time.monotonic()
        while True:
            task = asyncio.create_task(self._send(workload, headers, tally))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
            next_send += interval_s
            await asyncio.sleep(max(0.0, next_send - time.monotonic()))

    async def _send(self, workload: Workload, headers: dict[str, str], tally: Tally) -> None:
        assert self._session is not None
        tally.sent += 1
        tally.in_flight += 1
        body = orjson.dumps(
            {
                "model": self.model,
                "prompt": _PROMPT.format(n=tally.sent, name=workload.name),
                "max_tokens": MAX_TOKENS,
            }
        )
        try:
            async with self._session.post(self.url, data=body, headers=headers) as response:
                await response.read()
                tally.count(response.status)
        except (aiohttp.ClientError, TimeoutError):
            tally.failed += 1
        finally:
            tally.in_flight -= 1
