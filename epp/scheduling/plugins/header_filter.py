"""`header-based-testing-filter`: keep only the endpoints a test names in a request header.

For conformance and debugging: header `test-epp-endpoint-selection` lists endpoints,
comma-separated, as `ip` (every port of that address) or `ip:port`. Candidates not
listed are dropped. A request without the header (or with an empty one) keeps no
candidate, as upstream's filter does: a profile using this filter is for test traffic
only, and silently routing anywhere would hide a broken test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epp import parameters
from epp.scheduling.interfaces import Candidate, SchedulingRequest

HEADER = "test-epp-endpoint-selection"


def _parse(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.split(",") if part.strip())


class HeaderBasedTestingFilter:
    type_name = "header-based-testing-filter"

    def __init__(self, name: str = type_name, header: str = HEADER) -> None:
        self.name = name
        self.header = header.lower()

    @classmethod
    def from_parameters(
        cls, name: str, params: Mapping[str, object] | None
    ) -> HeaderBasedTestingFilter:
        reader = parameters.ParameterReader(params)
        header = reader.string("headerName", HEADER)
        reader.finish()
        return cls(name, header)

    def filter(
        self, request: SchedulingRequest, candidates: Sequence[Candidate]
    ) -> Sequence[Candidate]:
        value = request.headers.get(self.header, "")
        wanted = _parse(value) if value else frozenset()
        if not wanted:
            return []
        return [
            c for c in candidates if c.endpoint.address in wanted or c.endpoint.target in wanted
        ]
