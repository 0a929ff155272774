"""Small constructors for scheduling tests."""

from __future__ import annotations

from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import Endpoint, EndpointKey
from epp.scheduling.interfaces import Candidate, SchedulingRequest


def endpoint(name: str, port: int = 8000) -> Endpoint:
    index = sum(map(ord, name)) % 250 + 1
    return Endpoint(
        key=EndpointKey(f"ns/{name}-rank-0"),
        pod_name=name,
        namespace="ns",
        address=f"10.0.0.{index}",
        port=port,
    )


def candidate(name: str, *, stale: bool = False, **metrics: object) -> Candidate:
    return Candidate(endpoint(name), EndpointMetrics(**metrics), stale)  # type: ignore[arg-type]


def request(
    prompt: str = "", model: str = "llama", cache_salt: str = "", request_id: str = "r1"
) -> SchedulingRequest:
    return SchedulingRequest(
        request_id=request_id, target_model=model, prompt_text=prompt, cache_salt=cache_salt
    )
