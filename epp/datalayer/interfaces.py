"""The data layer's two extension points, declared together: data sources and extractors.

The data layer is a "hose / filter / consumer" pipeline. A :class:`DataSource` is the hose:
once per collector tick and endpoint it fetches one payload (for `metrics-data-source`, a
Prometheus text page). It then hands that same payload to each of its :class:`Extractor`
plugins in order; an extractor is the filter that turns the payload into fields of the
endpoint's :class:`~epp.datalayer.endpoint_metrics.EndpointMetrics`. Consumers (scorers,
saturation detection, pool gauges) read the metrics store and never see payloads.

Sources and extractors are typed by their payload: a source declares `output_type`, an
extractor `input_type`, and wiring an extractor to a source whose payload it cannot read is
a configuration error (:func:`check_wiring`), caught when the pipeline is built rather than
on every tick.

Neither plugin kills the collector's loop: a source that cannot produce a payload raises
:class:`FetchError`, an extractor that finds nothing usable raises :class:`ExtractError`,
and the collector counts and logs both and keeps the endpoint's previous metrics (which
then go stale by age).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import Endpoint


class FetchError(Exception):
    """A data source produced no payload this tick (connection refused, HTTP 503, ...).

    `unreachable` says the endpoint is proven not there (connection refused or reset): the
    picker stops routing to it at once instead of waiting for its metrics to go stale."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class ExtractError(Exception):
    """An extractor found nothing it could use in a payload (e.g. wrong engine's metrics)."""


@runtime_checkable
class Extractor(Protocol):
    """Turns one payload type into endpoint metrics.

    `extract` gets the metrics as they stand (from the store, or from the extractors that
    ran before it on this tick) and returns the new value: `current` itself when nothing
    changed, otherwise a new `EndpointMetrics` with this extractor's fields replaced and
    every other field carried over. It runs on the collector's event loop for every
    endpoint every tick, so it must be quick and must not block.
    """

    @property
    def type_name(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def input_type(self) -> type: ...

    def extract(
        self, payload: Any, endpoint: Endpoint, current: EndpointMetrics
    ) -> EndpointMetrics: ...


@runtime_checkable
class DataSource(Protocol):
    """Fetches one payload per endpoint per tick and pushes it to its extractors."""

    @property
    def type_name(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def output_type(self) -> type: ...

    @property
    def extractors(self) -> Sequence[Extractor]:
        """Extractors this source pushes each payload to, in order."""
        ...

    def add_extractor(self, extractor: Extractor) -> None:
        """Wire `extractor` to this source; ValueError if it cannot read the payload."""
        ...

    async def fetch(self, endpoint: Endpoint) -> Any:
        """One payload of `output_type`, or FetchError. Timeouts are the collector's job:
        it cancels a fetch that takes too long, and the source must then drop whatever
        connection state the cancelled fetch left half-used."""
        ...

    def forget(self, endpoint: Endpoint) -> None:
        """The endpoint left the pool: release what the source keeps for it (a connection)."""
        ...

    def close(self) -> None:
        """The source is no longer used (shutdown, or replaced by a config reload)."""
        ...


def produced_metrics(extractor: Extractor) -> frozenset[str]:
    """Custom metric names an extractor writes into `EndpointMetrics.custom` (an optional
    `produces` attribute); the config loader checks consumers against them."""
    produces = getattr(extractor, "produces", None)
    return frozenset(produces) if produces else frozenset()


def check_wiring(source: DataSource, extractor: Extractor) -> None:
    """Raise ValueError unless `extractor` can read what `source` produces."""
    produced, expected = source.output_type, extractor.input_type
    if not (isinstance(produced, type) and isinstance(expected, type)):
        raise ValueError(
            f"cannot wire extractor '{extractor.name}' (type {extractor.type_name}) to data "
            f"source '{source.name}' (type {source.type_name}): payload types must be "
            f"classes, got {produced!r} and {expected!r}"
        )
    if not issubclass(produced, expected):
        raise ValueError(
            f"extractor '{extractor.name}' (type {extractor.type_name}) expects "
            f"{_type_name(expected)} but data source '{source.name}' (type "
            f"{source.type_name}) produces {_type_name(produced)}; wire it to a source "
            f"that produces {_type_name(expected)}"
        )


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
