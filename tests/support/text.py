"""Editing test fixtures written as text, without silent no-ops."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def replaced(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new`; fails when `old` is not there (a fixture that
    changed would otherwise leave the test checking something else)."""
    assert old in text, f"{old!r} is not in the fixture any more"
    return text.replace(old, new)


def readme_commands(section: str) -> list[str]:
    """The shell commands of the README's `### <section>`, continuation lines joined, so a
    test can run them as a user would copy them."""
    text = README.read_text(encoding="utf-8")
    assert f"### {section}\n" in text, f"the README has no section {section!r} any more"
    body = text.split(f"### {section}\n", 1)[1].split("\n#", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", body, flags=re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line]
