"""Every scheduling extension point in one place, so the plugin surface is visible at once.

A plugin is a small class registered under its type string (see `epp.config.registry`);
it satisfies one or more of these protocols. The framework (`epp.scheduling.framework`)
calls them in this order for each request:

    profile handler picks profiles -> for each profile: data producers -> filters ->
    scorers (weighted sum) -> picker -> handler chooses the primary result.

What follows (pre-request, response hooks) is the request lifecycle's, declared in
`epp.requestcontrol.interfaces`; a scheduling plugin may implement those too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from epp.bodies.parsers import ParsedBody
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import Endpoint, SloTargets

CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Candidate:
    """An endpoint with the metrics it had when this request was scheduled, and what the
    picker routed there since those metrics were scraped."""

    endpoint: Endpoint
    metrics: EndpointMetrics
    stale: bool = False
    dispatched: int = 0  # requests routed here since the scrape
    dispatched_tokens: int = 0  # their estimated prompt tokens


@dataclass(slots=True)
class SchedulingRequest:
    """What the scheduler may look at for one request.

    `plugin_data` is per-request scratch space owned by data producers, keyed by the
    producer's plugin name (the prefix producer leaves its match there for the scorer).
    """

    request_id: str
    target_model: str
    prompt_text: str = ""
    cache_salt: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    priority: int = 0
    # Latency objectives (headers or the workload's WorkloadClass); None: no SLO.
    slo: SloTargets | None = None
    # Output tokens the client allows (`max_tokens`); 0: not given.
    max_output_tokens: int = 0
    plugin_data: dict[str, object] = field(default_factory=dict)
    # The parsed body (messages, prompt) for producers that read more than the prompt text.
    body: ParsedBody | None = None

    @property
    def input_tokens(self) -> int:
        """The prompt's length in tokens, estimated as the prefix index does (4 characters
        a token): the picker does not tokenize."""
        return len(self.prompt_text) // CHARS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class ProfileResult:
    """Chosen endpoints, best first (more than one when a picker returns fallbacks)."""

    targets: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class SchedulingResult:
    profile_results: Mapping[str, ProfileResult | None]
    primary_profile: str

    @property
    def primary(self) -> ProfileResult | None:
        return self.profile_results.get(self.primary_profile)


class Plugin(Protocol):
    @property
    def type_name(self) -> str: ...

    @property
    def name(self) -> str: ...


@runtime_checkable
class Filter(Plugin, Protocol):
    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]: ...


@runtime_checkable
class Scorer(Plugin, Protocol):
    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        """One score per candidate, same order; values are clamped to [0, 1]."""
        ...


@runtime_checkable
class Picker(Plugin, Protocol):
    def pick(
        self,
        request: SchedulingRequest,
        candidates: Sequence[Candidate],
        scores: Sequence[float],
    ) -> ProfileResult: ...


@runtime_checkable
class DataProducer(Plugin, Protocol):
    def produce(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> None:
        """Compute per-request data (e.g. prefix matches) before filters and scorers run."""
        ...


@runtime_checkable
class DataPreparer(Plugin, Protocol):
    async def prepare(self, request: SchedulingRequest) -> None:
        """Work a data producer must not do on the event loop's critical path (tokenizing
        a long prompt on a thread), awaited before the scheduling cycle; the producer's
        `produce` reads what it left in `plugin_data`."""
        ...


class ProfileHandler(Plugin, Protocol):
    def pick_profiles(
        self,
        request: SchedulingRequest,
        profiles: Mapping[str, object],
        results_so_far: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        """Profiles to run next; an empty list ends the cycle."""
        ...

    def process_results(
        self, request: SchedulingRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult: ...
