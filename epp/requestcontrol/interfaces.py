"""The request path's extension points, declared together: admission, and the request
lifecycle after scheduling.

    admission          may this request go now? (flow control, or shedding without it)
    pre-request        a target was chosen; the request is about to be forwarded
    response-received  the response's headers arrived (status, streaming or not)
    response-streaming each response body chunk, for plugins that ask for chunks
    response-complete  the request ended, on every path (success, upstream error, client
                       gone, protocol error), exactly once

Lifecycle plugins are registered by type string and configured like every other plugin;
`lifecycle.Lifecycle` runs them. They receive the scheduling cycle's own values
(`SchedulingRequest`, `SchedulingResult`, `Candidate`), so a scheduling plugin (the prefix
producer recording where a prompt went) can also be a lifecycle plugin without knowing
anything of the request path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from epp.bodies.usage import Usage
from epp.datastore.snapshot import SloTargets, Snapshot
from epp.flowcontrol.workload import WorkloadContext
from epp.scheduling.interfaces import Candidate, SchedulingRequest, SchedulingResult

# ---- admission ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    request_id: str
    headers: Mapping[str, str]
    priority: int
    size_bytes: int
    snapshot: Snapshot
    workload: WorkloadContext
    slo: SloTargets | None


class Hold(Protocol):
    """What an admitted request holds until it ends; released exactly once."""

    def release(self) -> None: ...


class AdmissionController(Protocol):
    async def admit(self, request: AdmissionRequest) -> Hold:
        """Return once the request may go, or raise the `InferenceError` the client gets
        (429, 503). A cancelled wait (client gone) leaves nothing held."""
        ...


# ---- request lifecycle -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseStart:
    status: int
    streaming: bool  # text/event-stream


@dataclass(frozen=True, slots=True)
class ResponseSummary:
    """How a request ended."""

    status: int  # 0: no response headers arrived
    streaming: bool
    completed: bool  # the response reached its end (not cut off, not a protocol error)
    usage: Usage | None
    ttft_s: float | None  # routing -> first response body chunk
    tpot_s: float | None  # per output token after the first (needs usage)
    duration_s: float  # first request header -> end


@runtime_checkable
class PreRequest(Protocol):
    type_name: str
    name: str

    def pre_request(self, request: SchedulingRequest, result: SchedulingResult) -> None: ...


@runtime_checkable
class ResponseReceived(Protocol):
    type_name: str
    name: str

    def response_received(
        self, request: SchedulingRequest, target: Candidate, response: ResponseStart
    ) -> None: ...


@runtime_checkable
class ResponseStreaming(Protocol):
    type_name: str
    name: str

    def response_streaming(
        self, request: SchedulingRequest, target: Candidate, chunk: bytes, end_of_stream: bool
    ) -> None: ...


@runtime_checkable
class ResponseComplete(Protocol):
    type_name: str
    name: str

    def response_complete(
        self, request: SchedulingRequest, target: Candidate, response: ResponseSummary
    ) -> None: ...


LIFECYCLE_KINDS: Sequence[tuple[str, type]] = (
    ("PreRequest", PreRequest),
    ("ResponseReceived", ResponseReceived),
    ("ResponseStreaming", ResponseStreaming),
    ("ResponseComplete", ResponseComplete),
)
