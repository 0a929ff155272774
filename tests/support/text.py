"""Editing test fixtures written as text, without silent no-ops."""

from __future__ import annotations


def replaced(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new`; fails when `old` is not there (a fixture that
    changed would otherwise leave the test checking something else)."""
    assert old in text, f"{old!r} is not in the fixture any more"
    return text.replace(old, new)
