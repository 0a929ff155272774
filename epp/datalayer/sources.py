"""`metrics-data-source`: fetches a model server's Prometheus page over HTTP.

`prometheus-data-source` is another type name for the same plugin. Each fetch is one GET of
`<scheme>://<ip>:<port><path>` on the source's own keep-alive client
(`epp.datalayer.http_client`, one connection per endpoint, reused tick after tick); the
payload is a :class:`~epp.datalayer.prometheus_text.MetricsPage`, parsed lazily by the
extractors that read it. A refused connection, a reset, a non-200 answer or an oversized
body is a :class:`~epp.datalayer.interfaces.FetchError`; the collector applies the
per-fetch timeout.

Parameters: `scheme` (`http` | `https`), `path` (`/metrics`), `insecureSkipVerify`
(false), `maxBodyBytes` (16 MiB).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Final

from epp import parameters
from epp.datalayer import http_client, interfaces, prometheus_text
from epp.datastore.snapshot import Endpoint

METRICS_DATA_SOURCE: Final = "metrics-data-source"
TYPE_NAMES: Final = (METRICS_DATA_SOURCE, "prometheus-data-source")
"""Type strings a config may use for :class:`MetricsDataSource`; the first is canonical."""

DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
# Ask for the classic text format: a server that also speaks OpenMetrics or protobuf must
# not switch formats under us.
_ACCEPT: Final = ("Accept", "text/plain; version=0.0.4")


class MetricsDataSource:
    """Scrapes `/metrics` (or `path`) of each endpoint and pushes the page to extractors."""

    output_type: Final = prometheus_text.MetricsPage

    def __init__(
        self,
        name: str = METRICS_DATA_SOURCE,
        *,
        scheme: str = "http",
        path: str = "/metrics",
        insecure_skip_verify: bool = False,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        type_name: str = METRICS_DATA_SOURCE,
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
        self.type_name = type_name
        self.scheme = scheme
        self.path = path
        self.insecure_skip_verify = insecure_skip_verify
        self.max_body_bytes = max_body_bytes
        self._extractors: tuple[interfaces.Extractor, ...] = ()
        self._client: http_client.KeepAliveClient | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def extractors(self) -> Sequence[interfaces.Extractor]:
        return self._extractors

    def add_extractor(self, extractor: interfaces.Extractor) -> None:
        interfaces.check_wiring(self, extractor)
        self._extractors = (*self._extractors, extractor)

    def url_for(self, endpoint: Endpoint) -> str:
        """The scrape URL of `endpoint`, for messages."""
        return f"{self.scheme}://{endpoint.target}{self.path}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.scheme != "https":
            return None
        context = ssl.create_default_context()
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def fetch(self, endpoint: Endpoint) -> prometheus_text.MetricsPage:
        client = self._client
        if client is None:
            client = self._client = http_client.KeepAliveClient(
                ssl_context=self._ssl_context(),
                max_body_bytes=self.max_body_bytes,
                extra_headers=(_ACCEPT,),
            )
        try:
            response = await client.get(endpoint.address, endpoint.port, self.path)
        except http_client.HttpError as exc:
            raise interfaces.FetchError(
                f"GET {self.url_for(endpoint)}: {exc}", unreachable=exc.unreachable
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise interfaces.FetchError(f"GET {self.url_for(endpoint)}: {exc}") from exc
        if response.status != 200:
            raise interfaces.FetchError(f"GET {self.url_for(endpoint)}: HTTP {response.status}")
        return prometheus_text.MetricsPage(response.body.decode("utf-8", "replace"))

    def forget(self, endpoint: Endpoint) -> None:
        if self._client is not None:
            self._client.forget(endpoint.address, endpoint.port)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def new_metrics_data_source(
    name: str, params: Mapping[str, object] | None = None, type_name: str = METRICS_DATA_SOURCE
) -> MetricsDataSource:
    """Registry factory: `params` as written in config (`scheme`, `path`, ...)."""
    reader = parameters.ParameterReader(params)
    scheme = reader.string("scheme", "http")
    if scheme not in ("http", "https"):
        raise parameters.ParameterError("scheme", f"must be 'http' or 'https', got {scheme!r}")
    path = reader.string("path", "/metrics")
    if not path.startswith("/"):
        raise parameters.ParameterError("path", f"must start with '/', got {path!r}")
    skip_verify = reader.boolean("insecureSkipVerify", False)
    max_body = reader.integer("maxBodyBytes", DEFAULT_MAX_BODY_BYTES, minimum=1)
    reader.finish()
    return MetricsDataSource(
        name,
        scheme=scheme,
        path=path,
        insecure_skip_verify=skip_verify,
        max_body_bytes=max_body,
        type_name=type_name,
    )
