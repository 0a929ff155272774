"""A clock and a pool the flow-control tests drive by hand."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping

from epp.config import flow_control as flow_section
from epp.datalayer.endpoint_metrics import EndpointLoad, EndpointMetrics
from epp.flowcontrol.controller import Admission, FlowController, FlowRequest
from epp.flowcontrol.outcomes import Rejection
from epp.flowcontrol.workload import WorkloadContext, WorkloadId
from epp.requestcontrol.admission import rejection_error

# Metrics in these tests never go stale on a slow machine.
NEVER_STALE = {"metricsStalenessThreshold": "1h"}


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakePool:
    """Endpoints' metrics; `scrape()` stamps a new scrape, as the collector would, and
    `route()` records a request routed to an endpoint since it (the data layer's ledger)."""

    _stamps = itertools.count(1)

    def __init__(self, endpoints: int = 1, waiting: int = 0) -> None:
        self.endpoints = endpoints
        self.waiting = waiting
        self.waiting_each: list[int] | None = None  # per endpoint; overrides `waiting`
        self.kv = 0.0
        self.updated_at = 0.0
        self.dispatched: list[int] = [0] * endpoints
        self.scrape()

    def scrape(self) -> None:
        self.updated_at = time.monotonic() + next(self._stamps) * 1e-6
        self.dispatched = [0] * self.endpoints

    def route(self) -> None:
        """A dispatched request reached an endpoint: the least loaded one, as the
        saturation filter would choose."""
        if self.endpoints:
            waiting = self.waiting_each or [self.waiting] * self.endpoints
            i = min(range(self.endpoints), key=lambda e: waiting[e] + self.dispatched[e])
            self.dispatched[i] += 1

    def saturate(self) -> None:
        self.waiting = 10
        self.scrape()

    def free(self) -> None:
        self.waiting = 0
        self.scrape()

    def __call__(self) -> list[EndpointLoad]:
        if len(self.dispatched) != self.endpoints:
            self.dispatched = [0] * self.endpoints
        waiting = self.waiting_each or [self.waiting] * self.endpoints
        return [
            EndpointLoad(
                EndpointMetrics(
                    waiting_queue_size=w, kv_cache_usage=self.kv, updated_at=self.updated_at
                ),
                d,
            )
            for w, d in zip(waiting, self.dispatched, strict=True)
        ]


def controller(
    flow: Mapping[str, object] | None = None,
    plugins: Mapping[str, object] | None = None,
    *,
    pool: FakePool | None = None,
    clock: FakeClock | None = None,
) -> tuple[FlowController, FakePool, FakeClock]:
    pool = pool or FakePool()
    clock = clock or FakeClock()
    plugins = plugins or {}
    detector = flow_section.detector(NEVER_STALE, plugins)
    settings = flow_section.settings(flow, detector, plugins)
    return FlowController(settings, pool=pool, clock=clock), pool, clock


async def admit(flow: FlowController, request: FlowRequest) -> Admission:
    """The controller's answer as the request path hands it to the client: an admission,
    or the InferenceError (429, 503) that its rejection becomes."""
    outcome = await flow.admit(request)
    if isinstance(outcome, Rejection):
        raise rejection_error(outcome)
    return outcome


def request(
    name: str,
    workload: str = "",
    criticality: int = 3,
    *,
    priority: int = 0,
    size_bytes: int = 0,
    fairness_id: str = "",
    max_concurrent: int | None = None,
    requests_per_second: float | None = None,
    burst: int | None = None,
) -> FlowRequest:
    workload_id = WorkloadId(workload or name)
    return FlowRequest(
        request_id=name,
        workload=WorkloadContext(workload_id, criticality),
        fairness_id=fairness_id or workload_id,
        priority=priority,
        size_bytes=size_bytes,
        max_concurrent=max_concurrent,
        requests_per_second=requests_per_second,
        burst=burst,
    )


async def until(condition: object, what: str = "condition", turns: int = 1000) -> None:
    """Yield to other tasks until `condition()` holds (no wall-clock waiting involved)."""
    for _ in range(turns):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


class Recorder:
    """Admits requests as tasks and records the order they are let through."""

    def __init__(self, flow: FlowController, pool: FakePool | None = None) -> None:
        self.flow = flow
        self.pool = pool  # when given, each admitted request is routed into it
        self.order: list[str] = []
        self.admissions: dict[str, Admission] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, req: FlowRequest) -> asyncio.Task[None]:
        async def run() -> None:
            admission = await admit(self.flow, req)
            if self.pool is not None:
                self.pool.route()
            self.order.append(req.request_id)
            self.admissions[req.request_id] = admission

        task = asyncio.create_task(run())
        self.tasks[req.request_id] = task
        return task

    async def enqueue(self, req: FlowRequest) -> asyncio.Task[None]:
        before = self.flow.queued()
        task = self.start(req)
        await until(lambda: self.flow.queued() > before or task.done(), "enqueued")
        return task

    async def settle(self) -> None:
        await until(
            lambda: all(t.done() for t in self.tasks.values() if t not in self._waiting()),
            "admissions settled",
        )

    def _waiting(self) -> set[asyncio.Task[None]]:
        return set()

    def release_all(self) -> None:
        for admission in self.admissions.values():
            admission.release()
