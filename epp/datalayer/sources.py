"""`metrics-data-source`: fetches a model server's Prometheus page over HTTP.

`prometheus-data-source` is another type name for the same plugin. Each fetch is one GET of
`<scheme>://<ip>:<port><path>` on the collector's shared `aiohttp.ClientSession` (so
connections are kept alive between ticks); the payload is a
:class:`~epp.datalayer.prometheus_text.MetricsPage`, parsed lazily by the extractors that
read it. A refused connection, a reset, a non-200 answer or an oversized body is a
:class:`~epp.datalayer.interfaces.FetchError`; the collector applies the per-fetch
timeout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import aiohttp
from yarl import URL

from epp.datalayer import interfaces, prometheus_text
from epp.datastore.snapshot import Endpoint

METRICS_DATA_SOURCE: Final = "metrics-data-source"
TYPE_NAMES: Final = (METRICS_DATA_SOURCE, "prometheus-data-source")
"""Type strings a config may use for :class:`MetricsDataSource`; the first is canonical."""

DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
# Ask for the classic text format: a server that also speaks OpenMetrics or protobuf must
# not switch formats under us.
_HEADERS: Final[Mapping[str, str]] = {"Accept": "text/plain; version=0.0.4"}
_URL_CACHE_LIMIT: Final = 4096


class MetricsDataSource:
    """Scrapes `/metrics` (or `path`) of each endpoint and pushes the page to extractors."""

    type_name: Final = METRICS_DATA_SOURCE
    output_type: Final = prometheus_text.MetricsPage

    def __init__(
        self,
        name: str = METRICS_DATA_SOURCE,
        *,
        scheme: str = "http",
        path: str = "/metrics",
        insecure_skip_verify: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(
                f"data source '{name}': scheme must be 'http' or 'https', got {scheme!r}"
            )
        if not path.startswith("/"):
            raise ValueError(f"data source '{name}': path must start with '/', got {path!r}")
        if max_body_bytes <= 0:
            raise ValueError(f"data source '{name}': max_body_bytes must be positive")
        self._name = name
        self.scheme = scheme
        self.path = path
        self.max_body_bytes = max_body_bytes
        # aiohttp: False = do not verify the server certificate, True = default checks.
        self._ssl = not insecure_skip_verify
        self._extractors: tuple[interfaces.Extractor, ...] = ()
        self._urls: dict[str, URL] = {}

    @property
    def name(self) -> str:
        return self._name

    @property
    def extractors(self) -> Sequence[interfaces.Extractor]:
        return self._extractors

    def add_extractor(self, extractor: interfaces.Extractor) -> None:
        interfaces.check_wiring(self, extractor)
        self._extractors = (*self._extractors, extractor)

    def url_for(self, endpoint: Endpoint) -> URL:
        """The scrape URL of `endpoint`, built once and reused on every tick."""
        url = self._urls.get(endpoint.target)
        if url is None:
            if len(self._urls) >= _URL_CACHE_LIMIT:
                self._urls.clear()  # endpoints churned a lot; rebuilding is cheap
            url = URL(f"{self.scheme}://{endpoint.target}{self.path}")
            self._urls[endpoint.target] = url
        return url

    async def fetch(
        self, endpoint: Endpoint, session: aiohttp.ClientSession
    ) -> prometheus_text.MetricsPage:
        url = self.url_for(endpoint)
        try:
            async with session.get(
                url, headers=_HEADERS, ssl=self._ssl, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise interfaces.FetchError(f"GET {url}: HTTP {response.status}")
                body = await self._read_body(url, response)
        except aiohttp.ClientError as exc:
            raise interfaces.FetchError(f"GET {url}: {_describe(exc)}") from exc
        except OSError as exc:
            raise interfaces.FetchError(f"GET {url}: {exc}") from exc
        return prometheus_text.MetricsPage(body.decode("utf-8", "replace"))

    async def _read_body(self, url: URL, response: aiohttp.ClientResponse) -> bytes:
        limit = self.max_body_bytes
        declared = response.content_length
        if declared is not None:
            if declared > limit:
                raise interfaces.FetchError(
                    f"GET {url}: body of {declared} bytes exceeds the {limit}-byte limit"
                )
            return await response.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise interfaces.FetchError(f"GET {url}: body exceeds the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)


def _describe(exc: aiohttp.ClientError) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_PARAMETERS: Final[Mapping[str, type]] = {
    "scheme": str,
    "path": str,
    "insecureSkipVerify": bool,
    "maxBodyBytes": int,
}


def new_metrics_data_source(
    name: str, parameters: Mapping[str, object] | None = None
) -> MetricsDataSource:
    """Registry factory: `parameters` as written in config (`scheme`, `path`, ...)."""
    given = dict(parameters or {})
    for key, value in given.items():
        expected = _PARAMETERS.get(key)
        if expected is None:
            raise ValueError(
                f"data source '{name}': unknown parameter {key!r} "
                f"(known: {', '.join(sorted(_PARAMETERS))})"
            )
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(
                f"data source '{name}': parameter {key!r} must be {expected.__name__}, "
                f"got {value!r}"
            )
    scheme, path = given.get("scheme", "http"), given.get("path", "/metrics")
    skip_verify, max_body = given.get("insecureSkipVerify", False), given.get("maxBodyBytes")
    assert isinstance(scheme, str) and isinstance(path, str) and isinstance(skip_verify, bool)
    return MetricsDataSource(
        name,
        scheme=scheme,
        path=path,
        insecure_skip_verify=skip_verify,
        max_body_bytes=max_body if isinstance(max_body, int) else DEFAULT_MAX_BODY_BYTES,
    )
