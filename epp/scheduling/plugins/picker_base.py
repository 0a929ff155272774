"""What every picker shares: a name, `maxNumOfEndpoints`, and its own random source."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import ClassVar, Self

from epp import parameters


class CountedPicker:
    """Base of pickers returning up to `maxNumOfEndpoints` endpoints, best first."""

    type_name: ClassVar[str]

    def __init__(
        self, name: str | None = None, *, max_endpoints: int = 1, rng: random.Random | None = None
    ) -> None:
        if max_endpoints < 1:
            raise ValueError(f"maxNumOfEndpoints must be at least 1, got {max_endpoints}")
        self.name = name if name is not None else self.type_name
        self.max_endpoints = max_endpoints
        self._rng = rng if rng is not None else random.Random()

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> Self:
        reader = parameters.ParameterReader(params)
        max_endpoints = reader.integer("maxNumOfEndpoints", 1, minimum=1)
        reader.finish()
        return cls(name, max_endpoints=max_endpoints)
