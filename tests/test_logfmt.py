"""Structured log lines: logfmt with the `extra=` fields appended."""

from __future__ import annotations

import logging

from epp.logfmt import LogfmtFormatter


def record(message: str, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("epp.test", logging.INFO, __file__, 1, message, None, None)
    r.__dict__.update(extra)
    return r


def test_fields_are_appended_and_quoted_when_needed():
    line = LogfmtFormatter().format(record("model rewritten", source="a b", to="c", n=3))
    assert line.startswith("time=")
    assert 'level=info logger=epp.test msg="model rewritten" source="a b" to=c n=3' in line


def test_quotes_and_newlines_are_escaped():
    line = LogfmtFormatter().format(record('say "hi"\nthere'))
    assert 'msg="say \\"hi\\"\\nthere"' in line
