"""Command-line argument types shared by every `sluice` command (picker, operator,
simulator, tools), so a flag means the same thing wherever it appears.

Booleans accept `--flag=false` as upstream's Go flags do; durations take Go-style values
(`50ms`, `1m30s`) and, as in Go, a number without a unit is an error (`5`: seconds or
milliseconds?); a bad value ends the command with one line that names the flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn

from epp import quantities

_UNIT_SECONDS = {"ms": 1e-3, "s": 1.0}


class OneLineParser(argparse.ArgumentParser):
    """Bad flags exit 2 with one line that names the problem (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def duration(text: str) -> float:
    """Seconds from `50ms`, `2s`, `1m30s`; a number needs a unit (only `0` goes without)."""
    try:
        return quantities.parse_duration(text, "duration")
    except ValueError as error:
        # argparse puts the flag's name in front of the message.
        raise argparse.ArgumentTypeError(str(error).removeprefix("duration: ")) from None


def duration_in(unit: str) -> Callable[[str], float]:
    """A duration in `unit` ("ms" or "s"): plain numbers are taken in that unit, suffixed
    ones (`20ms`, `1.5s`) are converted to it."""
    scale = _UNIT_SECONDS[unit]

    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return duration(text) / scale

    parse.__name__ = f"duration in {unit}"  # argparse names the type in its messages
    return parse


def fraction(text: str) -> float:
    """A number from 0 to 1 (a share, a sample rate)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {value}")
    return value
