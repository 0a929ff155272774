"""The effective config `--validate-config` prints: declared vs added by default, loadable."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from epp.config import effective, loader

HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def cfg(body: str) -> str:
    return HEADER + textwrap.dedent(body)


def marked(text: str, fragment: str) -> bool:
    """Whether the line containing `fragment` carries the added-by-default comment."""
    (line,) = [line for line in text.splitlines() if fragment in line]
    return "# added by default" in line


def test_empty_config_is_all_defaults() -> None:
    described = effective.describe("")
    assert described.declared == ()
    assert described.added == (
        "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer",
        "approx-prefix-cache-producer", "max-score-picker", "single-profile-handler",
        "metrics-data-source", "core-metrics-extractor", "in-flight-tracker",
    )  # fmt: skip
    assert described.summary().startswith("valid: 0 plugins declared, 9 added by default (")
    assert marked(described.text, "- name: default")
    assert marked(described.text, "- type: in-flight-tracker")
    assert "{pluginRef: prefix-cache-scorer, weight: 3}" in described.text


def test_declared_and_added_are_told_apart() -> None:
    text = cfg(
        """\
        plugins:
        - type: queue-scorer
        - name: kv
          type: kv-cache-utilization-scorer
        - type: prefix-cache-scorer
        - type: approx-prefix-cache-producer
          parameters: {autoTune: false}
        parser: {pluginRef: openai-parser}
        schedulingProfiles:
        - name: main
          plugins:
          - {pluginRef: kv, weight: 2}
          - pluginRef: queue-scorer
          - {pluginRef: prefix-cache-scorer, weight: 3}
        """
    )
    described = effective.describe(text)
    assert described.declared == (
        "queue-scorer", "kv", "prefix-cache-scorer", "approx-prefix-cache-producer",
    )  # fmt: skip
    assert described.summary() == (
        "valid: 4 plugins declared, 5 added by default (max-score-picker, "
        "single-profile-handler, metrics-data-source, core-metrics-extractor, "
        "in-flight-tracker); profiles: main"
    )
    body = described.text
    assert "- type: kv-cache-utilization-scorer\n  name: kv\n" in body
    assert "- type: approx-prefix-cache-producer\n  parameters: {autoTune: false}\n" in body
    assert not marked(body, "- type: queue-scorer")
    assert marked(body, "- type: max-score-picker")
    assert not marked(body, "- name: main")
    assert not marked(body, "{pluginRef: kv, weight: 2}")
    assert not marked(body, "{pluginRef: queue-scorer, weight: 1}")  # weight 1 made explicit
    assert marked(body, "  - pluginRef: max-score-picker")
    # Declared, but the profile runs it only because the prefix scorer reads it.
    assert marked(body, "  - pluginRef: approx-prefix-cache-producer")
    assert not marked(body, "parser: {pluginRef: openai-parser}")
    assert marked(body, "dataLayer:")


def test_flow_control_gate_filter_is_a_comment() -> None:
    text = cfg(
        """\
        featureGates: [flowControl]
        flowControl: {retryAfter: 2s}
        """
    )
    body = effective.describe(text).text
    assert "featureGates: [flowControl]" in body
    assert "flowControl: {retryAfter: 2s}" in body
    assert "  # - pluginRef: saturation-detector  (filter added by the flowControl gate)" in body
    assert marked(body, "saturationDetector: {}")


def test_invalid_config_raises() -> None:
    with pytest.raises(loader.ConfigError, match="unknown plugin type 'nope'"):
        effective.describe(cfg("plugins: [{type: nope}]"))


def _shape(config: loader.PickerConfig) -> object:
    return (
        sorted(config.plugins),
        {
            name: (
                [f.name for f in profile.filters],
                [(w.scorer.name, w.weight) for w in profile.scorers],
                sorted(p.name for p in profile.producers),
                profile.picker.name,
            )
            for name, profile in config.scheduler.profiles.items()
        },
        [(s.name, [e.name for e in s.extractors]) for s in config.data_sources],
        config.parser_type,
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        (DOCS / "configs" / "slo-aware.yaml").read_text(),
        (DOCS / "configs" / "predicted-latency.yaml").read_text(),
        cfg("featureGates: [flowControl]\nplugins: [{type: queue-scorer}]\n"),
    ],
    ids=["empty", "slo-aware", "predicted-latency", "flow-control"],
)
def test_effective_text_loads_back_into_the_same_config(text: str) -> None:
    again = loader.load_config(effective.describe(text).text)
    assert _shape(again) == _shape(loader.load_config(text))
