"""Token usage from responses: a JSON body's `usage`, or the `usage` of SSE `data:` events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_mapping(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(
        input_tokens=_int(usage.get("prompt_tokens", usage.get("input_tokens"))),
        output_tokens=_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        cached_tokens=cached,
    )


def usage_from_json(body: bytes) -> Usage | None:
    if b'"usage"' not in body:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if usage is None and isinstance(document.get("response"), dict):
        usage = document["response"].get("usage")  # Responses API wraps it
    return usage_from_mapping(usage)


class SSEUsageReader:
    """Feeds on SSE chunks as they pass; keeps the last non-null usage seen.

    Only lines that mention `"usage"` are parsed, and a line split across chunks is
    carried over, so the cost stays proportional to the usage events, not the stream.
    """

    __slots__ = ("_partial", "usage")

    def __init__(self) -> None:
        self._partial = b""
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if not self._partial and b'"usage"' not in chunk:
            # Keep only a trailing incomplete line, which may hold the start of a usage event.
            newline = chunk.rfind(b"\n")
            self._partial = chunk[newline + 1 :] if newline >= 0 else chunk
            if len(self._partial) > 1_000_000:
                self._partial = b""
            return
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._read_line(line)

    def finish(self) -> Usage | None:
        if self._partial:
            self._read_line(self._partial)
            self._partial = b""
        return self.usage

    def _read_line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return
        payload = line[5:].strip()
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            usage = event.get("usage")
            if usage is None and isinstance(event.get("response"), dict):
                usage = event["response"].get("usage")
            parsed = usage_from_mapping(usage)
            if parsed is not None:
                self.usage = parsed
