"""Everything one request carries from its first header to its release."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from epp.flowcontrol.controller import Admission
from epp.flowcontrol.workload import WorkloadContext
from epp.metrics import ObjectiveSeries
from epp.requests.parsers import ParsedBody
from epp.requests.rewrite import ModelNameRestorer
from epp.requests.usage import Usage
from epp.scheduling.interfaces import Candidate, SchedulingRequest, SchedulingResult


@dataclass(slots=True)
class RequestContext:
    request_id: str = ""
    path: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    # IPs from Envoy's subset hint; None = no hint (every endpoint is a candidate).
    subset: frozenset[str] | None = None
    body_chunks: list[bytes] = field(default_factory=list)
    body_size: int = 0

    parsed: ParsedBody | None = None
    model: str = ""  # as the client sent it
    target_model: str = ""  # after rewrites
    objective: str = ""
    priority: int = 0
    body_out: bytes = b""  # what goes upstream (the original bytes unless rewritten)
    # Flow control (feature gate flowControl): who sent the request, and its hold on the
    # flow controller once admitted (released in Director.complete).
    workload: WorkloadContext | None = None
    admission: Admission | None = None

    scheduling_request: SchedulingRequest | None = None
    scheduler: Any = None  # the scheduler this request was scheduled with (configs hot-swap)
    series: ObjectiveSeries | None = None  # its metric children, looked up once
    result: SchedulingResult | None = None
    targets: tuple[Candidate, ...] = ()
    restorer: ModelNameRestorer | None = None

    started_at: float = field(default_factory=time.monotonic)
    routed_at: float = 0.0
    first_chunk_at: float = 0.0
    last_chunk_at: float = 0.0
    response_status: int = 0
    response_streaming: bool = False
    usage: Usage | None = None

    # Accounting: set when the request took an in-flight slot; cleared by the one release.
    holds_slot: bool = False
    released: bool = False

    @property
    def primary_target(self) -> str:
        """For the destination header: Envoy's ORIGINAL_DST cluster accepts one ip:port only."""
        return self.targets[0].endpoint.target

    @property
    def destination(self) -> str:
        """For `envoy.lb` metadata: the primary and any fallbacks, comma-joined."""
        return ",".join(c.endpoint.target for c in self.targets)

    def body(self) -> bytes:
        chunks = self.body_chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
