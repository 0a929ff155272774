"""Strict reading of a plugin's `parameters:` mapping.

Every plugin factory reads its parameters through `ParameterReader` so that all plugins
reject the same mistakes the same way: an unknown key (with a "did you mean" hint), a
value of the wrong type, a number out of range. The errors carry the parameter's name
only; the config loader prefixes the path (`plugins[2].parameters.`) it knows.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence

from epp import quantities


class ParameterError(ValueError):
    """A plugin parameter is unknown, of the wrong type or out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` when a choice is close to `word`, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(mapping: Mapping[str, object], allowed: Sequence[str]) -> tuple[str, str] | None:
    """The first key of `mapping` not in `allowed`, with a hint for the message:
    ` (did you mean 'x'?)`, else ` (allowed: a, b)`, or ` (takes none)`. None when every key
    is allowed. Every strict reader of configuration (document sections, plugin parameters,
    flow control) reports unknown keys through this one function."""
    for key in mapping:
        if key in allowed:
            continue
        hint = did_you_mean(str(key), allowed)
        if not hint:
            hint = f" (allowed: {', '.join(allowed)})" if allowed else " (takes none)"
        return str(key), hint
    return None


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


class ParameterReader:
    """Reads typed values out of a parameters mapping, then checks nothing was left over.

    >>> reader = ParameterReader({"maxNumOfEndpoints": 2})
    >>> reader.integer("maxNumOfEndpoints", 1, minimum=1)
    2
    >>> reader.finish()
    """

    def __init__(self, parameters: Mapping[str, object] | None) -> None:
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, Mapping):
            raise ParameterError("", f"parameters must be a mapping, got {_type_name(parameters)}")
        self._parameters = parameters
        self._known: list[str] = []

    def has(self, key: str) -> bool:
        return key in self._parameters

    def _get(self, key: str) -> object:
        self._known.append(key)
        return self._parameters.get(key)

    def integer(
        self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(key, f"must be an integer, got {_type_name(value)} {value!r}")
        if minimum is not None and value < minimum:
            raise ParameterError(key, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ParameterError(key, f"must be at most {maximum}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float | None = None) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParameterError(key, f"must be a number, got {_type_name(value)} {value!r}")
        if minimum is not None and value < minimum:
            raise ParameterError(key, f"must be at least {minimum}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ParameterError(key, f"must be true or false, got {_type_name(value)} {value!r}")
        return value

    def string(self, key: str, default: str, *, non_empty: bool = True) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ParameterError(key, f"must be a string, got {_type_name(value)} {value!r}")
        if non_empty and not value:
            raise ParameterError(key, "must not be empty")
        return value

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        """Seconds from `50ms`, `2s`, `1m30s` (the parser flags use: a number needs a unit,
        only `0` goes without)."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ParameterError(key, f"must be a duration like '2s', got {_type_name(value)}")
        try:
            seconds = quantities.parse_duration(value, key)
        except ValueError as error:
            raise ParameterError(key, str(error).removeprefix(f"{key}: ")) from None
        if positive and (seconds <= 0 or not math.isfinite(seconds)):
            raise ParameterError(key, f"must be a positive duration, got {value!r}")
        return seconds

    def quantity(self, key: str, default: int = 0) -> int:
        """An integer from a Kubernetes quantity (`10Gi`, `1k`, `500`)."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ParameterError(key, f"must be a quantity like '1k', got {_type_name(value)}")
        try:
            return quantities.parse_quantity(value, key)
        except ValueError as error:
            raise ParameterError(key, str(error).removeprefix(f"{key}: ")) from None

    def value(self, key: str) -> object:
        """The raw value (None when absent), for a caller with its own checks."""
        return self._get(key)

    def mapping(self, key: str) -> Mapping[str, object] | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ParameterError(key, f"must be a mapping, got {_type_name(value)} {value!r}")
        return value

    def leftover(self) -> tuple[str, str] | None:
        """The first key no reader method asked for, with its hint (see `unknown_key`)."""
        return unknown_key(self._parameters, sorted(self._known))

    def finish(self) -> None:
        """Raise for the first key no reader method asked for."""
        found = self.leftover()
        if found is not None:
            key, hint = found
            raise ParameterError(key, f"unknown parameter{hint}")
