"""The real helm the chart tests run: `scripts/fetch-helm`'s pinned helm v4, fetched into
the repository's `.cache/` on first use (`scripts/setup` fetches it too)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "sluice"
FETCH = REPO / "scripts" / "fetch-helm"


class HelmUnavailable(Exception):
    """No helm binary could be had (no npm, no network, another platform)."""


def fetch() -> Path:
    result = subprocess.run([str(FETCH)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1:] or ["no reason given"]
        raise HelmUnavailable(reason[0])
    return Path(result.stdout.strip())


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class Helm:
    binary: Path

    def run(self, *args: str) -> Result:
        result = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=120
        )
        return Result(result.returncode, result.stdout, result.stderr)

    def template(self, *args: str) -> list[dict[str, Any]]:
        """The chart's objects, rendered as release `sluice` in namespace `inference`."""
        result = self.run("template", "sluice", str(CHART), "--namespace", "inference", *args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
