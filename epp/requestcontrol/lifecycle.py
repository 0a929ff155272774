"""Runs the request-lifecycle plugins of one config (see `interfaces`).

Hooks are isolated from each other: one that raises is logged and the others still run,
because what the other hooks release (in-flight counts, learned state) must be released
on every path. Each call is timed into `inference_extension_plugin_duration_seconds` with
one `perf_counter()` read per call, recorded after the hooks ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from time import perf_counter
from typing import Any

from epp import metrics
from epp.requestcontrol.interfaces import (
    PreRequest,
    ResponseComplete,
    ResponseReceived,
    ResponseStart,
    ResponseStreaming,
    ResponseSummary,
)
from epp.scheduling.interfaces import Candidate, SchedulingRequest, SchedulingResult

log = logging.getLogger(__name__)

_Step = tuple[Callable[..., None], str, tuple[str, str, str]]


def _steps(plugins: Sequence[Any], extension_point: str, method: str) -> tuple[_Step, ...]:
    return tuple(
        (getattr(p, method), p.name, (extension_point, p.type_name, p.name)) for p in plugins
    )


def _run(steps: tuple[_Step, ...], request: SchedulingRequest, *args: object) -> None:
    t = perf_counter()
    timings: list[tuple[tuple[str, str, str], float]] = []
    for hook, name, labels in steps:
        try:
            hook(request, *args)
        except Exception:
            log.exception("%s plugin %s failed for request %s", labels[0], name, request.request_id)
        now = perf_counter()
        timings.append((labels, now - t))
        t = now
    observe = metrics.observe_plugin_duration
    for (extension_point, plugin_type, plugin_name), seconds in timings:
        observe(extension_point, plugin_type, plugin_name, seconds)


class Lifecycle:
    """The lifecycle plugins of one config, by extension point; immutable once built."""

    def __init__(self, plugins: Iterable[object]) -> None:
        plugins = list(plugins)
        self.pre_request_plugins = tuple(p for p in plugins if isinstance(p, PreRequest))
        self.response_received_plugins = tuple(
            p for p in plugins if isinstance(p, ResponseReceived)
        )
        self.response_streaming_plugins = tuple(
            p for p in plugins if isinstance(p, ResponseStreaming)
        )
        self.response_complete_plugins = tuple(
            p for p in plugins if isinstance(p, ResponseComplete)
        )
        self._pre_request = _steps(self.pre_request_plugins, "PreRequest", "pre_request")
        self._received = _steps(
            self.response_received_plugins, "ResponseReceived", "response_received"
        )
        self._streaming = _steps(
            self.response_streaming_plugins, "ResponseStreaming", "response_streaming"
        )
        self._complete = _steps(
            self.response_complete_plugins, "ResponseComplete", "response_complete"
        )

    @property
    def wants_chunks(self) -> bool:
        """Whether any plugin reads response body chunks (else none are handed over)."""
        return bool(self._streaming)

    def pre_request(self, request: SchedulingRequest, result: SchedulingResult) -> None:
        _run(self._pre_request, request, result)

    def response_received(
        self, request: SchedulingRequest, target: Candidate, response: ResponseStart
    ) -> None:
        if self._received:
            _run(self._received, request, target, response)

    def response_streaming(
        self, request: SchedulingRequest, target: Candidate, chunk: bytes, end_of_stream: bool
    ) -> None:
        if self._streaming:
            _run(self._streaming, request, target, chunk, end_of_stream)

    def response_complete(
        self, request: SchedulingRequest, target: Candidate, response: ResponseSummary
    ) -> None:
        _run(self._complete, request, target, response)
