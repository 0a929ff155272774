"""docs/configuration.md cannot drift: its examples load, and every plugin type is there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from epp.config import loader, registry

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC = DOCS / "configuration.md"
TEXT = DOC.read_text(encoding="utf-8")
# Every EndpointPickerConfig shown anywhere in docs/ (other YAML, e.g. manifests, is skipped).
EXAMPLES = [
    block
    for page in sorted(DOCS.glob("*.md"))
    for document in re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    for block in document.split("\n---\n")
    if "kind: EndpointPickerConfig" in block
]


def test_the_docs_have_examples_and_sections_to_check():
    """The other tests here would pass vacuously if a pattern stopped matching."""
    assert len(EXAMPLES) >= 5
    assert len(re.findall(r"^### `([a-z-]+)`$", TEXT, flags=re.M)) >= len(registry.plugin_types())


def test_every_registered_plugin_type_has_a_section():
    documented = set(re.findall(r"^### `([a-z-]+)`$", TEXT, flags=re.M))
    missing = set(registry.plugin_types()) - documented
    assert not missing, f"document these plugin types in {DOC.name}: {sorted(missing)}"
    unknown = documented - set(registry.plugin_types())
    assert not unknown, f"{DOC.name} documents types the registry does not know: {unknown}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_is_a_valid_config(example):
    loader.load_config(example)  # every section, flowControl included


CONFIGS = sorted((DOCS / "configs").glob("*.yaml"))
CHART_FILES = DOCS.parent / "charts" / "sluice" / "files"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_the_chart_ships_the_same(path: Path) -> None:
    loader.load_config(path.read_text(encoding="utf-8"))
    chart_copy = CHART_FILES / f"config-{path.name}"
    assert chart_copy.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
        f"copy {path} to {chart_copy}: the chart's configPreset ships it"
    )


def test_there_are_shipped_configs() -> None:
    assert {p.stem for p in CONFIGS} == {
        "precise-prefix",
        "predicted-latency",
        "slo-aware",
        "slo-aware-flow-control",
    }
