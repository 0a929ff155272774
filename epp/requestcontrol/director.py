"""The director runs the named stages of the request path for one request.

    parse -> rewrite -> objectives -> admit -> candidates -> schedule -> pre_request (route)
    ... upstream answers; the protocol stream owns the `RoutedRequest` ...
    RoutedRequest.finish: metrics -> response-complete plugins -> release

Each stage is a method with that name, so a reader can follow a request top to bottom.
`route` takes the active `RequestPipeline` once, at its start, and the request uses that
pipeline (parser, admission, scheduler, lifecycle plugins) to its end: a config reload
swaps `Director.pipeline`, one reference, and never changes a request in flight.

Ownership: until `route` returns, the director holds what the request took and releases
it if routing fails; afterwards the returned `RoutedRequest` holds it, and its owner calls
`finish` once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from epp import errors, metrics
from epp.bodies.parsers import BodyParser, ParsedBody
from epp.bodies.rewrite import ModelNameRestorer, replace_model
from epp.datalayer.endpoint_metrics import MetricsStore
from epp.datastore.snapshot import Snapshot
from epp.flowcontrol.workload import DEFAULT_CRITICALITY
from epp.requestcontrol import objectives as request_objectives
from epp.requestcontrol.admission import NOTHING_HELD
from epp.requestcontrol.interfaces import AdmissionController, AdmissionRequest, Hold
from epp.requestcontrol.lifecycle import Lifecycle
from epp.requestcontrol.request import InboundRequest, ObjectiveLabels, RoutedRequest
from epp.requestcontrol.unanswered import UnansweredRequests
from epp.scheduling.framework import Scheduler
from epp.scheduling.interfaces import (
    Candidate,
    ProfileResult,
    SchedulingRequest,
    SchedulingResult,
)

log = logging.getLogger(__name__)

MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
HEADER_ONLY_PROFILE = "header-only"
_NO_LABELS: ObjectiveLabels = ("", "", "0")
_METHODS_WITH_A_BODY = frozenset({"POST", "PUT", "PATCH"})


class SnapshotSource(Protocol):
    @property
    def current(self) -> Snapshot: ...


@dataclass(frozen=True, slots=True)
class RequestPipeline:
    """Everything one config decides about a request, taken once per request."""

    parser: BodyParser
    admission: AdmissionController
    scheduler: Scheduler
    lifecycle: Lifecycle
    default_criticality: int = DEFAULT_CRITICALITY  # for requests that claim none


@dataclass(frozen=True, slots=True)
class Rewrite:
    target_model: str
    body: bytes  # what goes upstream: the original bytes unless the model changed
    restorer: ModelNameRestorer | None = None


class Director:
    def __init__(
        self,
        *,
        datastore: SnapshotSource,
        metrics_store: MetricsStore,
        pipeline: RequestPipeline,
        staleness_threshold_s: float = 2.0,
        response_sample_rate: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.pipeline = pipeline  # swapped whole on reload
        self._datastore = datastore
        self._metrics = metrics_store
        self._staleness_s = staleness_threshold_s
        self._sample_rate = response_sample_rate
        self._rng = rng or random.Random()
        self.unanswered: UnansweredRequests | None = None  # the picker sets it

    # ---- request stages -------------------------------------------------------------

    async def route(self, inbound: InboundRequest) -> RoutedRequest:
        """Choose the endpoint for a request with a body; raises InferenceError."""
        pipeline = self.pipeline
        snapshot = self._datastore.current
        try:
            parsed = self.parse(pipeline, inbound)
        except errors.InferenceError as error:
            self.count_error(error)
            raise
        rewrite = self.rewrite(inbound, parsed, snapshot)
        objectives = self.objectives(pipeline, inbound, snapshot)
        labels = metrics.objective_labels(
            parsed.model, rewrite.target_model, str(objectives.priority)
        )
        series = metrics.objective_series(labels)
        series.requests.inc()
        try:
            hold = await self.admit(pipeline, inbound, objectives, snapshot)
            try:
                # It may have waited in a queue (e.g. for the pool's first endpoint): route
                # over the endpoints there are now.
                candidates = self.candidates(inbound.subset, self._datastore.current)
                request, result = await self.schedule(
                    pipeline, inbound, parsed, rewrite, objectives, candidates
                )
            except BaseException:
                hold.release()
                raise
        except errors.InferenceError as error:
            self.count_error(error, labels)
            raise
        routed = RoutedRequest(
            scheduling_request=request,
            targets=result.primary.targets,  # type: ignore[union-attr]  # checked in schedule
            body=rewrite.body,
            restorer=rewrite.restorer,
            labels=labels,
            series=series,
            lifecycle=pipeline.lifecycle,
            hold=hold,
            received_at=inbound.received_at,
            observe=self._sampled(),
            unanswered=self.unanswered,
        )
        return self.pre_request(pipeline, routed, result)

    def route_header_only(self, inbound: InboundRequest) -> RoutedRequest:
        """A request without a body (e.g. GET): any ready endpoint will do."""
        pipeline = self.pipeline
        method = inbound.headers.get(":method", "")
        if method in _METHODS_WITH_A_BODY:
            # A model server would answer 400 too, but less clearly and after a round trip.
            error = errors.bad_request(
                f"empty request body: {method} {inbound.path or '/'} needs a JSON body"
            )
            self.count_error(error)
            raise error
        try:
            candidates = self.candidates(
                inbound.subset, self._datastore.current, no_endpoints_status=500
            )
        except errors.InferenceError as error:
            self.count_error(error)
            raise
        chosen = candidates[self._rng.randrange(len(candidates))]
        request = SchedulingRequest(
            request_id=inbound.request_id, target_model="", headers=inbound.headers
        )
        result = SchedulingResult(
            {HEADER_ONLY_PROFILE: ProfileResult((chosen,))}, HEADER_ONLY_PROFILE
        )
        routed = RoutedRequest(
            scheduling_request=request,
            targets=(chosen,),
            body=b"",
            restorer=None,
            labels=_NO_LABELS,
            series=None,
            lifecycle=pipeline.lifecycle,
            hold=NOTHING_HELD,
            received_at=inbound.received_at,
            observe=False,
        )
        return self.pre_request(pipeline, routed, result)

    def parse(self, pipeline: RequestPipeline, inbound: InboundRequest) -> ParsedBody:
        return pipeline.parser.parse(inbound.path, inbound.body)

    def rewrite(self, inbound: InboundRequest, parsed: ParsedBody, snapshot: Snapshot) -> Rewrite:
        body = inbound.body
        if not parsed.model:
            return Rewrite(parsed.model, body)
        target = inbound.headers.get(MODEL_REWRITE_HEADER) or parsed.model
        # InferenceModelRewrite objects override the header.
        rewrite_targets = snapshot.rewrite_targets(parsed.model)
        if rewrite_targets:
            if len(rewrite_targets) == 1:
                target = rewrite_targets[0].model
            else:
                weights = [t.weight for t in rewrite_targets]
                target = self._rng.choices(rewrite_targets, weights)[0].model
        if target == parsed.model:
            return Rewrite(target, body)
        assert parsed.document is not None
        log.debug("model rewritten", extra={"from": parsed.model, "to": target})
        return Rewrite(
            target,
            replace_model(body, parsed.document, target),
            ModelNameRestorer(parsed.model, target),
        )

    def objectives(
        self, pipeline: RequestPipeline, inbound: InboundRequest, snapshot: Snapshot
    ) -> request_objectives.Objectives:
        """Priority (InferenceObjective), workload and latency objectives (see
        `objectives`)."""
        found = request_objectives.read(inbound.headers, snapshot, pipeline.default_criticality)
        if log.isEnabledFor(logging.DEBUG):
            context = found.workload
            log.debug(
                "workload context: request %s workload %r criticality %d (header: %s)",
                inbound.request_id,
                context.workload_id,
                context.criticality,
                context.problem.value,
                extra={"request_id": inbound.request_id, "slo": found.slo},
            )
        return found

    async def admit(
        self,
        pipeline: RequestPipeline,
        inbound: InboundRequest,
        objectives: request_objectives.Objectives,
        snapshot: Snapshot,
    ) -> Hold:
        return await pipeline.admission.admit(
            AdmissionRequest(
                request_id=inbound.request_id,
                headers=inbound.headers,
                priority=objectives.priority,
                size_bytes=len(inbound.body),
                snapshot=snapshot,
                workload=objectives.workload,
                slo=objectives.slo,
            )
        )

    def candidates(
        self, subset: frozenset[str] | None, snapshot: Snapshot, no_endpoints_status: int = 503
    ) -> list[Candidate]:
        endpoints = snapshot.endpoints
        if not endpoints:
            raise errors.InferenceError(
                no_endpoints_status,
                "ServiceUnavailable" if no_endpoints_status == 503 else "Internal",
                "no ready endpoints in the pool",
            )
        if subset is not None:
            endpoints = tuple(e for e in endpoints if e.address in subset)
            if not endpoints:
                raise errors.unavailable("no pool endpoint matches the subset hint")
        now = time.monotonic()
        load, threshold = self._metrics.load, self._staleness_s
        fresh: list[Candidate] = []
        stale: list[Candidate] = []
        for endpoint in endpoints:
            m, dispatched, tokens = load(endpoint.key)
            if m.is_stale(now, threshold):
                stale.append(Candidate(endpoint, m, True, dispatched, tokens))
            else:
                fresh.append(Candidate(endpoint, m, False, dispatched, tokens))
        # Endpoints whose metrics went stale get nothing while a fresh one exists.
        return fresh or stale

    async def schedule(
        self,
        pipeline: RequestPipeline,
        inbound: InboundRequest,
        parsed: ParsedBody,
        rewrite: Rewrite,
        objectives: request_objectives.Objectives,
        candidates: Sequence[Candidate],
    ) -> tuple[SchedulingRequest, SchedulingResult]:
        request = SchedulingRequest(
            request_id=inbound.request_id,
            target_model=rewrite.target_model,
            prompt_text=parsed.prompt_text,
            cache_salt=parsed.cache_salt,
            headers=inbound.headers,
            priority=objectives.priority,
            slo=objectives.slo,
            max_output_tokens=parsed.max_tokens,
            body=parsed,
        )
        if pipeline.scheduler.preparers:
            await pipeline.scheduler.prepare(request)  # e.g. tokenizing, off the loop
        result = pipeline.scheduler.schedule(request, candidates)
        primary = result.primary
        if primary is None or not primary.targets:
            raise errors.unavailable("no endpoint passed the scheduling filters")
        return request, result

    def pre_request(
        self, pipeline: RequestPipeline, routed: RoutedRequest, result: SchedulingResult
    ) -> RoutedRequest:
        """The target is chosen: the data layer's ledger and the pre-request plugins hear of
        it; the request is routed."""
        request = routed.scheduling_request
        self._metrics.record_dispatch(routed.targets[0].endpoint.key, request.input_tokens)
        pipeline.lifecycle.pre_request(request, result)
        return routed

    def _sampled(self) -> bool:
        rate = self._sample_rate
        return rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)

    # ---- errors ---------------------------------------------------------------------

    def count_error(
        self, error: errors.InferenceError, labels: ObjectiveLabels | None = None
    ) -> None:
        metrics.count_error(labels or _NO_LABELS, error.code)
        log.debug("request failed", extra={"error": str(error)})
