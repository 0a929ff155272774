"""The director runs the named stages of the request path for one request.

    parse -> rewrite -> objective -> admit -> candidates -> schedule -> pre_request   (route)
    ... upstream answers ...
    response hooks -> metrics -> release                                (complete)

Each stage is a method with that name, so a reader can follow a request top to bottom.
Every request that takes an in-flight slot gives it back exactly once in `complete`,
whatever path it ends on; `Accounting` makes that checkable.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from epp import metrics
from epp.datalayer.endpoint_metrics import MetricsStore
from epp.datastore.snapshot import EndpointKey, Snapshot
from epp.flowcontrol import controller as flow
from epp.flowcontrol import saturation, workload
from epp.requestcontrol.context import RequestContext
from epp.requests import errors
from epp.requests.parsers import BodyParser
from epp.requests.rewrite import ModelNameRestorer, replace_model
from epp.scheduling.interfaces import (
    Candidate,
    ResponseOutcome,
    SchedulingRequest,
    SchedulingResult,
)

log = logging.getLogger(__name__)

MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
DEFAULT_FLOW = "default-flow"


class Scheduling(Protocol):
    def schedule(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> SchedulingResult: ...

    def pre_request(self, request: SchedulingRequest, result: SchedulingResult) -> None: ...

    def response_complete(
        self, request: SchedulingRequest, target: Candidate, outcome: ResponseOutcome
    ) -> None: ...


@dataclass(slots=True)
class Accounting:
    """Per-request counters; all return to zero when no request is in flight."""

    in_flight: int = 0
    per_endpoint: dict[EndpointKey, int] = field(default_factory=dict)
    released_twice: int = 0  # must stay 0; a test asserts it

    def take(self, key: EndpointKey) -> None:
        self.in_flight += 1
        self.per_endpoint[key] = self.per_endpoint.get(key, 0) + 1

    def give_back(self, key: EndpointKey) -> None:
        self.in_flight -= 1
        left = self.per_endpoint.get(key, 0) - 1
        if left > 0:
            self.per_endpoint[key] = left
        else:
            self.per_endpoint.pop(key, None)

    def is_idle(self) -> bool:
        return self.in_flight == 0 and not self.per_endpoint and self.released_twice == 0


class Director:
    def __init__(
        self,
        *,
        snapshot: Callable[[], Snapshot],
        metrics_store: MetricsStore,
        scheduler: Callable[[], Scheduling],
        parser: Callable[[], BodyParser],
        staleness_threshold_s: float = 2.0,
        rng: random.Random | None = None,
        flow_control: Callable[[], flow.FlowController | None] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._metrics = metrics_store
        self._scheduler = scheduler
        self._parser = parser
        self._staleness_s = staleness_threshold_s
        self._rng = rng or random.Random()
        self._flow_control = flow_control
        # Without flow control, sheddable requests are still dropped when the pool is
        # saturated (DESIGN §4's error table), judged by a default utilization detector.
        self._shed_detector = saturation.UtilizationDetector()
        self.accounting = Accounting()

    # ---- request stages -------------------------------------------------------------

    async def route(self, ctx: RequestContext) -> None:
        """Choose the endpoint for a request with a body; raises InferenceError."""
        snapshot = self._snapshot()
        body = ctx.body()
        self.parse(ctx, body)
        self.rewrite(ctx, snapshot, body)
        self.objective(ctx, snapshot)
        ctx.series = metrics.objective_series(ctx.model, ctx.target_model, str(ctx.priority))
        ctx.series.requests.inc()
        await self.admit(ctx, snapshot)
        if ctx.admission is not None:
            # It may have waited in a queue (e.g. for the pool's first endpoint): route over
            # the endpoints there are now.
            snapshot = self._snapshot()
        candidates = self.candidates(ctx, snapshot)
        self.schedule(ctx, candidates)
        self.pre_request(ctx)

    def route_header_only(self, ctx: RequestContext) -> None:
        """A request without a body (e.g. GET): any ready endpoint will do."""
        candidates = self.candidates(ctx, self._snapshot(), no_endpoints_status=500)
        chosen = candidates[self._rng.randrange(len(candidates))]
        ctx.targets = (chosen,)
        self._take_slot(ctx)

    def parse(self, ctx: RequestContext, body: bytes) -> None:
        ctx.parsed = parsed = self._parser().parse(ctx.path, body)
        ctx.model = ctx.target_model = parsed.model
        ctx.body_out = body

    def rewrite(self, ctx: RequestContext, snapshot: Snapshot, body: bytes) -> None:
        parsed = ctx.parsed
        if parsed is None or not parsed.model:
            return
        target = ctx.headers.get(MODEL_REWRITE_HEADER) or parsed.model
        # InferenceModelRewrite objects override the header.
        rewrite_targets = snapshot.rewrite_targets(parsed.model)
        if rewrite_targets:
            if len(rewrite_targets) == 1:
                target = rewrite_targets[0].model
            else:
                weights = [t.weight for t in rewrite_targets]
                target = self._rng.choices(rewrite_targets, weights)[0].model
        if target != parsed.model:
            assert parsed.document is not None
            ctx.body_out = replace_model(body, parsed.document, target)
            ctx.target_model = target
            ctx.restorer = ModelNameRestorer(parsed.model, target)
            log.debug("model rewritten", extra={"from": parsed.model, "to": target})

    def objective(self, ctx: RequestContext, snapshot: Snapshot) -> None:
        """The InferenceObjective the client named gives the request its priority (else 0)."""
        ctx.objective = ctx.headers.get(OBJECTIVE_HEADER, "")
        objective = snapshot.objectives.get(ctx.objective) if ctx.objective else None
        ctx.priority = objective.priority if objective is not None else 0

    async def admit(self, ctx: RequestContext, snapshot: Snapshot) -> None:
        """Flow control (feature gate flowControl): wait for dispatch, or 429/503."""
        controller = self._flow_control() if self._flow_control is not None else None
        if controller is None:
            if ctx.priority < 0 and self._saturated(snapshot):
                raise errors.exhausted("the pool is saturated; sheddable request dropped")
            return
        context = workload.extract(
            ctx.headers.get(workload.HEADER),
            snapshot.workload_classes,
            controller.settings.workload.default_criticality,
        )
        ctx.workload = context
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "workload context: request %s workload %r criticality %d (header: %s)",
                ctx.request_id,
                context.workload_id,
                context.criticality,
                context.problem.value,
                extra={
                    "request_id": ctx.request_id,
                    "workload_id": context.workload_id,
                    "criticality": context.criticality,
                    "header_problem": context.problem.value,
                },
            )
        fairness_id = ctx.headers.get(FAIRNESS_HEADER) or (
            context.workload_id if context.problem is workload.HeaderProblem.NONE else DEFAULT_FLOW
        )
        workload_class = snapshot.workload_classes.get(context.workload_id)
        limits = workload_class.limits if workload_class is not None else None
        ctx.admission = await controller.admit(
            flow.FlowRequest(
                request_id=ctx.request_id,
                workload=context,
                fairness_id=fairness_id,
                priority=ctx.priority,
                size_bytes=ctx.body_size,
                max_concurrent=limits.max_concurrent_requests if limits else None,
                requests_per_second=limits.requests_per_second if limits else None,
                burst=limits.burst if limits else None,
            )
        )

    def _saturated(self, snapshot: Snapshot) -> bool:
        get = self._metrics.get
        pool = [get(e.key) for e in snapshot.endpoints]
        return self._shed_detector.saturation(pool, time.monotonic()) >= 1.0

    def candidates(
        self, ctx: RequestContext, snapshot: Snapshot, no_endpoints_status: int = 503
    ) -> list[Candidate]:
        endpoints = snapshot.endpoints
        if not endpoints:
            raise errors.InferenceError(
                no_endpoints_status,
                "ServiceUnavailable" if no_endpoints_status == 503 else "Internal",
                "no ready endpoints in the pool",
            )
        subset = ctx.subset
        if subset is not None:
            endpoints = tuple(e for e in endpoints if e.address in subset)
            if not endpoints:
                raise errors.unavailable("no pool endpoint matches the subset hint")
        now = time.monotonic()
        get, threshold = self._metrics.get, self._staleness_s
        fresh: list[Candidate] = []
        stale: list[Candidate] = []
        for endpoint in endpoints:
            m = get(endpoint.key)
            if m.is_stale(now, threshold):
                stale.append(Candidate(endpoint, m, True))
            else:
                fresh.append(Candidate(endpoint, m, False))
        # Endpoints whose metrics went stale get nothing while a fresh one exists.
        return fresh or stale

    def schedule(self, ctx: RequestContext, candidates: Sequence[Candidate]) -> None:
        parsed = ctx.parsed
        request = SchedulingRequest(
            request_id=ctx.request_id,
            target_model=ctx.target_model,
            prompt_text=parsed.prompt_text if parsed else "",
            cache_salt=parsed.cache_salt if parsed else "",
            headers=ctx.headers,
            priority=ctx.priority,
        )
        scheduler = self._scheduler()
        result = scheduler.schedule(request, candidates)
        primary = result.primary
        if primary is None or not primary.targets:
            raise errors.unavailable("no endpoint passed the scheduling filters")
        ctx.scheduling_request, ctx.scheduler, ctx.result = request, scheduler, result
        ctx.targets = primary.targets

    def pre_request(self, ctx: RequestContext) -> None:
        assert ctx.scheduling_request is not None and ctx.result is not None
        ctx.scheduler.pre_request(ctx.scheduling_request, ctx.result)
        self._take_slot(ctx)

    # ---- end of a request -----------------------------------------------------------

    def fail(self, ctx: RequestContext, error: errors.InferenceError) -> None:
        metrics.request_error_total.labels(
            ctx.model, ctx.target_model, str(ctx.priority), error.code
        ).inc()
        log.debug("request failed", extra={"request_id": ctx.request_id, "error": str(error)})
        self.complete(ctx, completed=False)

    def complete(self, ctx: RequestContext, *, completed: bool) -> None:
        """Release everything the request holds. Safe to call on every path; acts once."""
        if ctx.released:
            if ctx.holds_slot:
                self.accounting.released_twice += 1
            return
        ctx.released = True
        if ctx.admission is not None:
            ctx.admission.release()
        if not ctx.holds_slot:
            return
        ctx.holds_slot = False
        target = ctx.targets[0]
        self.accounting.give_back(target.endpoint.key)
        labels = (ctx.model, ctx.target_model, str(ctx.priority))
        series = ctx.series or metrics.objective_series(*labels)
        metrics.running_requests.labels(ctx.model).dec()
        now = time.monotonic()
        usage = ctx.usage
        ttft = tpot = None
        if ctx.first_chunk_at and ctx.routed_at:
            ttft = ctx.first_chunk_at - ctx.routed_at
            if usage and usage.output_tokens > 1 and ctx.last_chunk_at > ctx.first_chunk_at:
                tpot = (ctx.last_chunk_at - ctx.first_chunk_at) / (usage.output_tokens - 1)
        success = completed and 200 <= ctx.response_status < 300
        if success:
            series.duration.observe(now - ctx.started_at)
            if usage is not None:
                series.input_tokens.observe(usage.input_tokens)
                series.output_tokens.observe(usage.output_tokens)
            if ctx.response_streaming and ttft is not None:
                series.ttft.observe(ttft)
                if tpot is not None:
                    series.tpot.observe(tpot)
        elif ctx.response_status >= 400:
            metrics.request_error_total.labels(*labels, f"upstream_{ctx.response_status}").inc()
        if ctx.scheduling_request is not None and ctx.scheduler is not None:
            outcome = ResponseOutcome(
                status_code=ctx.response_status,
                input_tokens=usage.input_tokens if usage else 0,
                output_tokens=usage.output_tokens if usage else 0,
                cached_tokens=usage.cached_tokens if usage else 0,
                ttft_s=ttft,
                tpot_s=tpot,
                completed=completed,
            )
            try:
                ctx.scheduler.response_complete(ctx.scheduling_request, target, outcome)
            except Exception:  # a plugin bug must not leak the request's other slots
                log.exception("response-complete plugin failed")

    def _take_slot(self, ctx: RequestContext) -> None:
        ctx.routed_at = time.monotonic()
        ctx.holds_slot = True
        self.accounting.take(ctx.targets[0].endpoint.key)
        metrics.running_requests.labels(ctx.model).inc()
