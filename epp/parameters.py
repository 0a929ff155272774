"""Strict reading of a plugin's `parameters:` mapping.

Every plugin factory reads its parameters through `ParameterReader` so that all plugins
reject the same mistakes the same way: an unknown key (with a "did you mean" hint), a
value of the wrong type, a number out of range. The errors carry the parameter's name
only; the config loader prefixes the path (`plugins[2].parameters.`) it knows.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


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

    def mapping(self, key: str) -> Mapping[str, object] | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ParameterError(key, f"must be a mapping, got {_type_name(value)} {value!r}")
        return value

    def finish(self) -> None:
        """Raise for the first key no reader method asked for."""
        for key in self._parameters:
            if key not in self._known:
                allowed = sorted(self._known)
                hint = did_you_mean(str(key), allowed)
                if not hint:
                    hint = (
                        f" (accepted: {', '.join(allowed)})" if allowed else " (takes none)"
                    )
                raise ParameterError(str(key), f"unknown parameter{hint}")
