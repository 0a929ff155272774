"""The data layer: collectors scrape model servers and keep each endpoint's metrics fresh.

A collector runs one loop per endpoint. Each tick it calls the endpoint's data sources
(`metrics-data-source` fetches `/metrics`), and each source pushes its payload to its
extractors, which turn it into fields of :class:`~epp.datalayer.endpoint_metrics.EndpointMetrics`.
"""
