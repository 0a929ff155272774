"""Prometheus text exposition format (version 0.0.4), parsed for a scrape loop.

The collector reads every endpoint's `/metrics` page every 50 ms, and a vLLM page is a few
hundred lines of which the picker wants perhaps six (most are histogram buckets). So the
page is parsed lazily: :class:`MetricsPage` keeps the text and, when an extractor asks for
a metric name, finds that name's lines with `str.find` (C speed) and parses only those,
caching the result so that several extractors sharing one fetch pay once. Parsed lines
are also remembered across pages (servers repeat most lines from tick to tick), so an
unchanged line costs a dict lookup instead of a parse. The metric name
must be followed by `{`, a space or a tab, so `vllm:foo` does not pick up `vllm:foo_bucket`.
The format requires all lines of a metric family to form one group, so a scan ends at the
first `#` line after a matching sample (the next family's HELP/TYPE) instead of reading
on to the end of the page; samples of a histogram's `_bucket`/`_sum`/`_count`, which
interleave, are still all found, because no `#` line separates them.

:func:`parse` is the full, validating parser (every line, HELP and TYPE included) for
tests, tools and extractors that want the whole page.

Format facts handled here: `# HELP name text` (text escapes `\\\\` and `\\n`),
`# TYPE name counter|gauge|histogram|summary|untyped`, other `#` lines are comments, blank
lines are skipped, a sample is `name[{label="value",...}] value [timestamp_ms]`, label
values escape `\\\\`, `\\"` and `\\n`, values may be `NaN`, `+Inf`, `-Inf`. Histogram and
summary series (`_bucket`, `_sum`, `_count`, quantiles) are plain samples under their own
names. A malformed line never stops a scrape: the lazy path skips it and records why in
`MetricsPage.errors`; :func:`parse` raises :class:`PrometheusParseError` (line number, reason
and the line) or, with `strict=False`, skips and records the same message.

Known limit of the lazy path: it finds samples at the start of a line only, so a sample
line indented with spaces (legal, never seen from real servers) is found by :func:`parse`
but not by :meth:`MetricsPage.samples`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

__all__ = [
    "Exposition",
    "MetricsPage",
    "PrometheusParseError",
    "Sample",
    "parse",
    "parse_sample_line",
]

METRIC_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})

_NO_LABELS: Mapping[str, str] = MappingProxyType({})
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# One `name="value"` pair and the separator after it; the value may hold escapes.
_LABEL_RE = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*')
_ESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)
_LABEL_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_HELP_ESCAPES = {"\\": "\\", "n": "\n"}
_MAX_ERROR_LINE_CHARS = 120

# Lines the lazy path has parsed, by their exact text. A server repeats most of the lines
# an extractor asks for from one scrape to the next (the cache-config line, a queue that
# stays at 0), and parsing a line with many labels costs ~10 µs while a dict lookup costs
# well under 1 µs. Samples are immutable (labels are read-only proxies), so sharing them
# between pages and endpoints is safe. Cleared when full rather than kept in LRU order:
# refilling is cheap.
_PARSED_LINES: dict[str, Sample] = {}
_PARSED_LINES_LIMIT = 16384


class Sample(NamedTuple):
    """One sample line. Treat `labels` as read-only: the lazy path shares samples."""

    name: str
    labels: Mapping[str, str]
    value: float
    timestamp_ms: int | None = None


class PrometheusParseError(ValueError):
    """A line that is not valid text exposition format."""

    def __init__(self, line_no: int, line: str, reason: str) -> None:
        self.line_no = line_no
        self.line = line
        self.reason = reason
        shown = line if len(line) <= _MAX_ERROR_LINE_CHARS else line[:_MAX_ERROR_LINE_CHARS] + "..."
        super().__init__(f"line {line_no}: {reason}: {shown!r}")


def _unescape(text: str, escapes: Mapping[str, str], what: str) -> str:
    def one(match: re.Match[str]) -> str:
        char = match.group(1)
        try:
            return escapes[char]
        except KeyError:
            raise ValueError(f"invalid escape sequence '\\{char}' in {what}") from None

    return _ESCAPE_RE.sub(one, text)


def _parse_number(token: str) -> float:
    # float() also takes '1_000' and surrounding whitespace; the format allows neither.
    if "_" in token:
        raise ValueError(f"invalid sample value {token!r}")
    try:
        return float(token)
    except ValueError:
        raise ValueError(f"invalid sample value {token!r}") from None


def parse_sample_line(line: str, name_end: int = -1) -> Sample:
    """Parse one sample line; ValueError (with the reason) if it is malformed.

    `name_end` is the length of the metric name when the caller already knows it.
    """
    if name_end < 0:
        match = _NAME_RE.match(line)
        if match is None:
            raise ValueError("expected a metric name")
        name_end = match.end()
    name = line[:name_end]
    pos = name_end
    length = len(line)
    if pos < length and line[pos] not in " \t{":
        raise ValueError(f"invalid character {line[pos]!r} in metric name")
    while pos < length and line[pos] in " \t":
        pos += 1
    labels: Mapping[str, str] = _NO_LABELS
    if pos < length and line[pos] == "{":
        pos += 1
        found: dict[str, str] = {}
        count = 0
        while True:
            while pos < length and line[pos] in " \t":
                pos += 1
            if pos < length and line[pos] == "}":
                pos += 1
                break
            match = _LABEL_RE.match(line, pos)
            if match is None:
                raise ValueError(f"malformed label at column {pos + 1}")
            value = match.group(2)
            if "\\" in value:
                value = _unescape(value, _LABEL_ESCAPES, "label value")
            found[match.group(1)] = value
            count += 1
            pos = match.end()
            if pos < length and line[pos] == ",":
                pos += 1
            elif not (pos < length and line[pos] == "}"):
                raise ValueError(f"expected ',' or '}}' after label at column {pos + 1}")
        if len(found) != count:
            raise ValueError("duplicate label name")
        if count:
            labels = found
    tokens = line[pos:].split()
    if not tokens:
        raise ValueError("missing sample value")
    if len(tokens) > 2:
        raise ValueError("unexpected text after value and timestamp")
    value = _parse_number(tokens[0])
    timestamp: int | None = None
    if len(tokens) == 2:
        stamp = tokens[1]
        if "_" in stamp:
            raise ValueError(f"invalid timestamp {stamp!r}")
        try:
            timestamp = int(stamp)
        except ValueError:
            raise ValueError(f"invalid timestamp {stamp!r}") from None
    return Sample(name, labels, value, timestamp)


class MetricsPage:
    """One fetched `/metrics` page, parsed per metric name on demand and cached.

    This is the payload type of `metrics-data-source`. It belongs to one tick of one
    endpoint's loop, so it is never shared between threads.
    """

    __slots__ = ("_cache", "errors", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.errors: list[str] = []
        self._cache: dict[str, list[Sample]] = {}

    def samples(self, name: str) -> list[Sample]:
        """Every sample whose metric name is exactly `name`, in page order."""
        cached = self._cache.get(name)
        if cached is None:
            cached = self._cache[name] = self._scan(name)
        return cached

    def metric_type(self, name: str) -> str | None:
        """The `# TYPE` declared for `name`, or None when the page declares none."""
        marker = f"# TYPE {name} "
        text = self.text
        if text.startswith(marker):
            start = 0
        else:
            at = text.find("\n" + marker)
            if at < 0:
                return None
            start = at + 1
        end = text.find("\n", start)
        words = text[start : len(text) if end < 0 else end].split()
        return words[3] if len(words) == 4 and words[3] in METRIC_TYPES else None

    def _scan(self, name: str) -> list[Sample]:
        text = self.text
        size = len(name)
        needle = "\n" + name
        found: list[Sample] = []
        if text.startswith(name):
            at = -1  # the first line has no newline before it
        else:
            at = text.find(needle)
            if at < 0:
                return found
        while True:
            start = at + 1
            after = start + size
            if text[after : after + 1] in ("{", " ", "\t"):
                end = text.find("\n", after)
                if end < 0:
                    end = len(text)
                line = text[start:end]
                sample = _PARSED_LINES.get(line)
                if sample is None:
                    try:
                        sample = parse_sample_line(line, size)
                    except ValueError as exc:
                        self.errors.append(f"{exc}: {_shorten(line)!r}")
                    else:
                        if sample.labels:
                            sample = sample._replace(labels=MappingProxyType(sample.labels))
                        if len(_PARSED_LINES) >= _PARSED_LINES_LIMIT:
                            _PARSED_LINES.clear()
                        _PARSED_LINES[line] = sample
                if sample is not None:
                    found.append(sample)
                if text.startswith("\n#", end):
                    # The next family's HELP/TYPE: the format keeps a metric's lines in one
                    # group, so the rest of the page cannot hold more of `name`. Stopping
                    # here spares a scan to the end of the page for every metric read.
                    return found
                at = text.find(needle, end)
            else:
                at = text.find(needle, after)
            if at < 0:
                return found


@dataclass(slots=True)
class Exposition:
    """A fully parsed page."""

    samples: list[Sample] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def by_name(self, name: str) -> list[Sample]:
        return [sample for sample in self.samples if sample.name == name]


def parse(text: str, *, strict: bool = True) -> Exposition:
    """Parse a whole page, every line validated.

    strict=True raises PrometheusParseError at the first malformed line; strict=False skips
    malformed lines and lists the same messages in `Exposition.errors`.
    """
    result = Exposition()
    for line_no, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            if line[0] == "#":
                _parse_comment(line, result)
            else:
                result.samples.append(parse_sample_line(line))
        except ValueError as exc:
            error = PrometheusParseError(line_no, raw, str(exc))
            if strict:
                raise error from None
            result.errors.append(str(error))
    return result


def _parse_comment(line: str, result: Exposition) -> None:
    parts = line[1:].split(None, 2)
    if not parts or parts[0] not in ("HELP", "TYPE"):
        return  # a plain comment
    if len(parts) < 2 or _NAME_RE.fullmatch(parts[1]) is None:
        raise ValueError(f"# {parts[0]} needs a valid metric name")
    name = parts[1]
    rest = parts[2] if len(parts) == 3 else ""
    if parts[0] == "TYPE":
        if rest not in METRIC_TYPES:
            known = ", ".join(sorted(METRIC_TYPES))
            raise ValueError(f"unknown metric type {rest!r} (expected one of {known})")
        if name in result.types:
            raise ValueError(f"second TYPE line for {name}")
        result.types[name] = rest
    else:
        result.help[name] = _unescape(rest, _HELP_ESCAPES, "HELP text") if "\\" in rest else rest


def _shorten(line: str) -> str:
    return line if len(line) <= _MAX_ERROR_LINE_CHARS else line[:_MAX_ERROR_LINE_CHARS] + "..."
