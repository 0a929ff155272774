"""A request on its way through the picker, as the request path sees it.

* `InboundRequest` — what the protocol layer hands over once the request's body is whole:
  headers, path, subset hint, body. Frozen: nothing downstream changes it.
* `RoutedRequest` — what `Director.route` returns: where the request goes (`targets`),
  the body to send (`body`), how to restore the model name in the response (`restorer`),
  whether its response body must be looked at (`observe`), and the one hold on everything
  the request took (admission, lifecycle state, running gauge). Its owner, the protocol
  stream, calls `finish` exactly once when the request ends, whichever way it ends.

A response is observed — its chunks timed, its usage read — when something needs it: the
model name to restore, a plugin that reads chunks, or the request drawn in the
`--response-sample-rate` sample that feeds latency metrics and the latency predictor.
The others cost the picker the same whatever their length: a gateway that allows it stops
sending their body (ext_proc `mode_override`), and in full-duplex mode their chunks go back
to Envoy untouched.
* `ResponseProgress` — what the protocol layer observed of the response (status, timing of
  the first and last body chunk, usage), handed to `finish`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import Gauge

from epp import cardinality, metrics
from epp.bodies.rewrite import ModelNameRestorer
from epp.bodies.usage import Usage
from epp.requestcontrol.interfaces import Hold, ResponseStart, ResponseSummary
from epp.requestcontrol.lifecycle import Lifecycle
from epp.requestcontrol.unanswered import UnansweredRequests
from epp.scheduling.interfaces import Candidate, SchedulingRequest

ObjectiveLabels = metrics.ObjectiveLabels  # model, target model, priority


@dataclass(frozen=True, slots=True)
class InboundRequest:
    request_id: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    # IPs from Envoy's subset hint; None = no hint (every endpoint is a candidate).
    subset: frozenset[str] | None = None
    received_at: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class ResponseProgress:
    status: int = 0
    streaming: bool = False
    first_chunk_at: float = 0.0
    last_chunk_at: float = 0.0
    usage: Usage | None = None


class RoutedRequest:
    __slots__ = (
        "_hold",
        "_lifecycle",
        "_running",
        "_series",
        "_unanswered",
        "body",
        "labels",
        "observe",
        "received_at",
        "restorer",
        "routed_at",
        "scheduling_request",
        "targets",
    )

    def __init__(
        self,
        *,
        scheduling_request: SchedulingRequest,
        targets: tuple[Candidate, ...],
        body: bytes,
        restorer: ModelNameRestorer | None,
        labels: ObjectiveLabels,
        series: metrics.ObjectiveSeries | None,
        lifecycle: Lifecycle,
        hold: Hold,
        received_at: float,
        observe: bool = True,
        unanswered: UnansweredRequests | None = None,
    ) -> None:
        self._unanswered = unanswered
        self.scheduling_request = scheduling_request
        self.targets = targets
        self.body = body
        self.restorer = restorer
        self.labels = labels
        self.received_at = received_at
        # Look at the response body: the model to restore, chunks a plugin reads, or sampled.
        self.observe = observe or restorer is not None or lifecycle.wants_chunks
        self.routed_at = time.monotonic()
        self._series = series
        self._lifecycle = lifecycle
        self._hold = hold
        self._running: Gauge = metrics.running_gauge(labels[0])
        self._running.inc()

    @property
    def request_id(self) -> str:
        return self.scheduling_request.request_id

    @property
    def primary_target(self) -> str:
        """For the destination header: Envoy's ORIGINAL_DST cluster accepts one ip:port only."""
        return self.targets[0].endpoint.target

    @property
    def destination(self) -> str:
        """For `envoy.lb` metadata: the primary and any fallbacks, comma-joined."""
        return ",".join(c.endpoint.target for c in self.targets)

    @property
    def wants_chunks(self) -> bool:
        return self._lifecycle.wants_chunks

    def response_received(self, status: int, streaming: bool) -> None:
        self._lifecycle.response_received(
            self.scheduling_request, self.targets[0], ResponseStart(status, streaming)
        )

    def response_chunk(self, chunk: bytes, end_of_stream: bool) -> None:
        self._lifecycle.response_streaming(
            self.scheduling_request, self.targets[0], chunk, end_of_stream
        )

    def finish(self, progress: ResponseProgress, *, completed: bool) -> None:
        """The request ended: record it and release everything it holds. Called once."""
        try:
            summary = self._summary(progress, completed)
            self._record(summary)
            if self._unanswered is not None:
                self._unanswered.request_ended(self.targets[0].endpoint.key, summary)
            self._lifecycle.response_complete(self.scheduling_request, self.targets[0], summary)
        finally:
            self._running.dec()
            self._hold.release()

    def _summary(self, progress: ResponseProgress, completed: bool) -> ResponseSummary:
        usage = progress.usage
        ttft = tpot = None
        if progress.first_chunk_at:
            ttft = progress.first_chunk_at - self.routed_at
            output = usage.output_tokens if usage is not None else 0
            if output > 1 and progress.last_chunk_at > progress.first_chunk_at:
                tpot = (progress.last_chunk_at - progress.first_chunk_at) / (output - 1)
        return ResponseSummary(
            status=progress.status,
            streaming=progress.streaming,
            completed=completed,
            usage=usage,
            ttft_s=ttft,
            tpot_s=tpot,
            duration_s=time.monotonic() - self.received_at,
        )

    def _record(self, summary: ResponseSummary) -> None:
        if summary.completed and 200 <= summary.status < 300:
            series = self._series or metrics.objective_series(self.labels)
            series.duration.observe(summary.duration_s)
            usage = summary.usage
            if usage is not None:
                series.input_tokens.observe(usage.input_tokens)
                series.output_tokens.observe(usage.output_tokens)
            if summary.streaming and summary.ttft_s is not None:
                series.ttft.observe(summary.ttft_s)
                if summary.tpot_s is not None:
                    series.tpot.observe(summary.tpot_s)
        elif summary.status >= 400:
            metrics.count_error(self.labels, cardinality.upstream_error_code(summary.status))
