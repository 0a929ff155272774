"""Admission: may a request go now? One `AdmissionController` per config, chosen by the
`flowControl` feature gate; both answer with the error table in `epp/errors.py`.

* `SaturationShedding` (gate off): every request goes at once, except sheddable ones
  (priority < 0), which get 429 while the configured saturation detector reports the pool
  full.
* `FlowControlAdmission` (gate on): the request's flow (fairness id, priority, workload)
  waits in the flow controller's queues; its rejections become 429 (limits, full queues,
  shedding; with retry-after) or 503 (TTL expired, picker stopping).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from epp import errors
from epp.datalayer.endpoint_metrics import EndpointLoad
from epp.flowcontrol import controller as flow
from epp.flowcontrol import workload
from epp.flowcontrol.interfaces import SaturationDetector
from epp.flowcontrol.outcomes import Rejection
from epp.requestcontrol.interfaces import AdmissionRequest, Hold

FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
DEFAULT_FLOW = "default-flow"

PoolMetrics = Callable[[], Sequence[EndpointLoad]]


class _NothingHeld:
    __slots__ = ()

    def release(self) -> None:
        pass


NOTHING_HELD: Hold = _NothingHeld()


class SaturationShedding:
    """Without flow control: shed sheddable requests while the pool is saturated."""

    def __init__(self, detector: SaturationDetector, pool: PoolMetrics) -> None:
        self.detector = detector
        self._pool = pool

    async def admit(self, request: AdmissionRequest) -> Hold:
        if request.priority < 0 and self.detector.saturation(self._pool(), time.monotonic()) >= 1:
            raise errors.exhausted("the pool is saturated; sheddable request dropped")
        return NOTHING_HELD


def rejection_error(rejection: Rejection) -> errors.InferenceError:
    if rejection.reason.retryable_later:
        return errors.exhausted(rejection.message, rejection.retry_after_s)
    return errors.unavailable(rejection.message)


class FlowControlAdmission:
    """With flow control: wait for dispatch from the controller's queues."""

    def __init__(self, controller: flow.FlowController) -> None:
        self.controller = controller

    async def admit(self, request: AdmissionRequest) -> Hold:
        context = request.workload
        fairness_id = request.headers.get(FAIRNESS_HEADER) or (
            context.workload_id if context.problem is workload.HeaderProblem.NONE else DEFAULT_FLOW
        )
        workload_class = request.snapshot.workload_classes.get(context.workload_id)
        limits = workload_class.limits if workload_class is not None else None
        ttft_ms = request.slo.ttft_ms if request.slo is not None else None
        outcome = await self.controller.admit(
            flow.FlowRequest(
                request_id=request.request_id,
                workload=context,
                fairness_id=fairness_id,
                priority=request.priority,
                size_bytes=request.size_bytes,
                max_concurrent=limits.max_concurrent_requests if limits else None,
                requests_per_second=limits.requests_per_second if limits else None,
                burst=limits.burst if limits else None,
                ttft_slo_s=ttft_ms / 1000 if ttft_ms is not None else None,
            )
        )
        if isinstance(outcome, Rejection):
            raise rejection_error(outcome)
        return outcome
