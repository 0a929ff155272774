"""Durations (`50ms`, `2s`, `1m30s`) and Kubernetes quantities (`10Gi`, `1k`) as numbers."""

from __future__ import annotations

import math
import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_QUANTITY_FACTORS = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_duration(text: str | int | float, what: str = "duration") -> float:
    """Seconds from a Go-style duration (`1m30s`, `50ms`). As in Go, a number needs a unit;
    only zero may go without one (`0`), since zero seconds and zero milliseconds agree."""
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a duration like '50ms' or '2s', got {text!r}")
    value = str(text).strip()
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and math.isfinite(number):
        if number < 0:
            raise ValueError(f"{what}: must not be negative, got {text!r}")
        if number == 0:
            return 0.0
        plain = f"{number:g}"
        raise ValueError(f"{what}: {value!r} has no unit (write {plain}s or {plain}ms)")
    pos, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS_S[match.group(2)]
        pos = match.end()
    if value.startswith("-") and pos == 0:
        raise ValueError(f"{what}: must not be negative, got {text!r}")
    if pos != len(value) or not value:
        raise ValueError(f"{what}: expected a duration like '50ms', '2s' or '1m30s', got {text!r}")
    return seconds


def parse_quantity(text: str | int | float, what: str = "quantity") -> int:
    """An integer from a Kubernetes quantity (`10Gi`, `1k`, `500`)."""
    if isinstance(text, bool):
        raise ValueError(f"{what}: expected a quantity like '1k' or '10Gi', got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _QUANTITY.match(text.strip())
        if match is None:
            raise ValueError(f"{what}: expected a quantity like '1k' or '10Gi', got {text!r}")
        value = float(match.group(1)) * _QUANTITY_FACTORS[match.group(2)]
    if value < 0:
        raise ValueError(f"{what}: must not be negative, got {text!r}")
    return int(value)
