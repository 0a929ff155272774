"""Configs using every plugin type, the data-layer section, and their precise errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from epp.config import data_layer as section
from epp.config import registry
from epp.config.loader import ConfigError, load_config
from epp.datalayer import custom_metrics, extractors, interfaces, sources
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datalayer.prometheus_text import MetricsPage
from epp.datastore.snapshot import Endpoint, EndpointKey
from epp.scheduling.plugins.header_filter import HeaderBasedTestingFilter
from epp.scheduling.plugins.metric_scorer import MetricScorer
from epp.scheduling.plugins.profile_handler import MultiProfileHandler
from epp.scheduling.plugins.random_pickers import WeightedRandomPicker
from tests.config.test_loader import cfg
from tests.support.text import replaced

EVERY_SCORER = """
plugins:
- {type: queue-scorer}
- {type: kv-cache-utilization-scorer}
- {type: running-requests-size-scorer}
- {type: lora-affinity-scorer}
- {type: prefix-cache-scorer, parameters: {minBlocksForFullScore: 8}}
- {type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 32, autoTune: false}}
- {type: metric-scorer, parameters: {metricName: depth, min: 0, max: 50, defaultValue: 50}}
- {type: prometheus-metric, name: depth, parameters: {selector: 'q{model="m"}'}}
- {type: core-metrics-extractor}
- {type: metrics-data-source, parameters: {path: /metrics}}
- {type: weighted-random-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: all
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: running-requests-size-scorer}
  - {pluginRef: lora-affinity-scorer}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: metric-scorer, weight: 2}
  - {pluginRef: weighted-random-picker}
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}, {pluginRef: depth}]
"""


def test_a_profile_with_every_scorer_and_a_wired_data_layer() -> None:
    config = load_config(cfg(EVERY_SCORER))
    profile = config.scheduler.profiles["all"]
    assert [w.scorer.type_name for w in profile.scorers] == [
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "running-requests-size-scorer",
        "lora-affinity-scorer",
        "prefix-cache-scorer",
        "metric-scorer",
    ]
    assert isinstance(profile.picker, WeightedRandomPicker) and profile.picker.max_endpoints == 2
    assert [p.name for p in profile.producers] == ["approx-prefix-cache-producer"]
    (source,) = config.data_sources
    assert isinstance(source, sources.MetricsDataSource)
    assert [e.name for e in source.extractors] == ["core-metrics-extractor", "depth"]
    scorer = config.plugins["metric-scorer"]
    assert isinstance(scorer, MetricScorer) and scorer.default_value == 50


def test_llm_d_data_section_and_prometheus_data_source_name() -> None:
    text = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
        "plugins:\n- {type: prometheus-data-source, name: scrape, parameters: {path: /m}}\n"
        "- {type: core-metrics-extractor, name: core}\n"
        "data:\n  sources: [{pluginRef: scrape, extractors: [{pluginRef: core}]}]\n"
    )
    (source,) = load_config(text).data_sources
    assert (source.name, source.type_name, getattr(source, "path")) == (  # noqa: B009
        "scrape",
        "prometheus-data-source",
        "/m",
    )


def test_default_data_layer_is_scrape_plus_core_metrics() -> None:
    (source,) = load_config(None).data_sources
    assert (source.name, [e.name for e in source.extractors]) == (
        "metrics-data-source",
        ["core-metrics-extractor"],
    )


def test_declared_core_extractor_with_engine_mappings_tunes_the_default_pipeline() -> None:
    config = load_config(
        cfg("""
        plugins:
        - type: core-metrics-extractor
          parameters:
            defaultEngine: trt
            engines:
              trt: {waiting: trt:queue, running: [trt:running, trt:active], kvUsage: trt:kv}
    """)
    )
    (source,) = config.data_sources
    (core,) = source.extractors
    assert isinstance(core, extractors.CoreMetricsExtractor)
    page_text = "trt:queue 4\ntrt:active 2\ntrt:kv 0.5\n"
    endpoint = Endpoint(EndpointKey("ns/p-rank-0"), "p", "ns", "127.0.0.1", 1, engine="trt")
    metrics = core.extract(MetricsPage(page_text), endpoint, EndpointMetrics())
    assert (metrics.waiting_queue_size, metrics.running_requests) == (4, 2)
    assert metrics.kv_cache_usage == 0.5


def test_multi_profile_handler_config() -> None:
    config = load_config(
        cfg("""
        plugins:
        - {type: multi-profile-handler, parameters: {primaryProfile: tested, fallback: true}}
        - {type: header-based-testing-filter}
        - {type: queue-scorer}
        - {type: random-picker}
        schedulingProfiles:
        - {name: tested, plugins: [{pluginRef: header-based-testing-filter},
                                   {pluginRef: queue-scorer}]}
        - {name: everyone, plugins: [{pluginRef: queue-scorer}, {pluginRef: random-picker}]}
    """)
    )
    handler = config.scheduler.handler
    assert isinstance(handler, MultiProfileHandler) and handler.primary_profile == "tested"
    assert isinstance(config.scheduler.profiles["tested"].filters[0], HeaderBasedTestingFilter)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # handlers
        (
            "plugins: [{type: multi-profile-handler, parameters: {primaryProfile: b}}]\n"
            "schedulingProfiles: [{name: a}]\n",
            r"plugins\[0\]\.parameters\.primaryProfile: no scheduling profile named 'b'",
        ),
        (
            "schedulingProfiles: [{name: a}, {name: b}]\n"
            "plugins: [{type: single-profile-handler}]\n",
            r"plugins\[0\]: single-profile-handler runs exactly one profile, but 2 .*"
            "multi-profile-handler",
        ),
        # plugin parameters
        (
            "plugins: [{type: metric-scorer}]\n",
            r"plugins\[0\]\.parameters\.metricName \(metric-scorer 'metric-scorer'\): required",
        ),
        (
            "plugins: [{type: random-picker, parameters: {maxNumOfEndpoint: 2}}]\n",
            r"maxNumOfEndpoint \(random-picker .*did you mean 'maxNumOfEndpoints'",
        ),
        (
            "plugins: [{type: prefix-cache-scorer, parameters: {minBlocksForFullScore: x}}]\n",
            r"plugins\[0\]\.parameters\.minBlocksForFullScore .*must be an integer",
        ),
        (
            "plugins: [{type: prometheus-metric, name: d, parameters: {selector: 'q{a=b}'}}]\n",
            r"plugins\[0\]\.parameters\.selector .*cannot read a label matcher",
        ),
        (
            "plugins: [{type: metrics-data-source, parameters: {scheme: ftp}}]\n",
            r"plugins\[0\]\.parameters\.scheme .*must be 'http' or 'https'",
        ),
        (
            "plugins:\n- type: core-metrics-extractor\n"
            "  parameters: {engines: {x: {waiting: a}}}\n",
            r"parameters\.engines\.x\.running .*required",
        ),
        (
            "plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: trt}\n",
            r"parameters\.defaultEngine .*no metric mapping for 'trt'",
        ),
        # data layer wiring
        (
            "dataLayer: {sources: [{pluginRef: metrics-data-source}]}\n",
            r"dataLayer\.sources\[0\]\.extractors: data source 'metrics-data-source' needs",
        ),
        (
            "dataLayer: {sources: [{pluginRef: metrics-data-source, extractors: "
            "[{pluginRef: core}]}]}\n",
            r"dataLayer\.sources\[0\]\.extractors\[0\]\.pluginRef: no plugin named 'core'",
        ),
        (
            "plugins: [{type: queue-scorer}]\n"
            "dataLayer: {sources: [{pluginRef: metrics-data-source, extractors: "
            "[{pluginRef: queue-scorer}]}]}\n",
            r"extractors\[0\]\.pluginRef: 'queue-scorer' \(type queue-scorer\) is not an extractor",
        ),
        (
            "data: {sources: [{pluginRef: core-metrics-extractor, extractors: "
            "[{pluginRef: core-metrics-extractor}]}]}\n",
            r"data\.sources\[0\]\.pluginRef: 'core-metrics-extractor' .* is not a data source",
        ),
        (
            "dataLayer: {sources: [{pluginRef: metrics-data-source, extractor: []}]}\n",
            r"unknown key 'extractor' in dataLayer\.sources\[0\] \(did you mean 'extractors'",
        ),
        ("dataLayer: {source: []}\n", r"unknown key 'source' in dataLayer .did you mean"),
        (
            "plugins: [{type: prometheus-metric, name: d, parameters: {selector: q}}]\n",
            r"plugins\[0\]: extractor 'd' is declared but not wired",
        ),
        (
            "plugins:\n- {type: metric-scorer, parameters: {metricName: depth}}\n",
            r"plugins\[0\] \(metric-scorer 'metric-scorer'\): reads custom metric 'depth', but "
            r"no extractor in dataLayer produces it",
        ),
        (
            "dataLayer:\n  sources:\n  - {pluginRef: metrics-data-source, extractors: "
            "[{pluginRef: core-metrics-extractor}]}\n  - {pluginRef: metrics-data-source, "
            "extractors: [{pluginRef: core-metrics-extractor}]}\n",
            r"dataLayer\.sources\[1\]: data source 'metrics-data-source' is listed twice",
        ),
    ],
)
def test_precise_errors(body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(cfg(body))


class _JsonSource:
    """A data source with another payload type, registered for one test."""

    type_name = "json-data-source"
    output_type = dict

    def __init__(self, name: str) -> None:
        self.name = name
        self.extractors: list[interfaces.Extractor] = []

    def add_extractor(self, extractor: interfaces.Extractor) -> None:
        interfaces.check_wiring(self, extractor)
        self.extractors.append(extractor)

    async def fetch(self, endpoint: Endpoint) -> Any:
        return {}

    def forget(self, endpoint: Endpoint) -> None:
        pass

    def close(self) -> None:
        pass


def test_payload_type_mismatch_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def create(name: str, params: Mapping[str, object] | None) -> _JsonSource:
        return _JsonSource(name)

    monkeypatch.setitem(registry._FACTORIES, "json-data-source", create)
    with pytest.raises(ConfigError) as caught:
        load_config(
            cfg("""
            plugins: [{type: json-data-source, name: js}, {type: core-metrics-extractor}]
            dataLayer:
              sources: [{pluginRef: js, extractors: [{pluginRef: core-metrics-extractor}]}]
        """)
        )
    message = str(caught.value)
    assert message.startswith("dataLayer.sources[0].extractors[0]: extractor ")
    assert "expects epp.datalayer.prometheus_text.MetricsPage" in message
    assert "'js' (type json-data-source) produces builtins.dict" in message


def test_reload_keeps_an_unchanged_data_layer_and_replaces_a_changed_one() -> None:
    first = load_config(cfg(EVERY_SCORER))
    same = load_config(cfg(EVERY_SCORER + "featureGates: [dataLayer]\n"), previous=first)
    assert same.data_sources is first.data_sources
    assert same.plugins["depth"] is first.plugins["depth"]
    assert (
        same.plugins["approx-prefix-cache-producer"]
        is first.plugins["approx-prefix-cache-producer"]
    )  # stateful scheduling plugin kept too
    changed = load_config(
        cfg(replaced(EVERY_SCORER, "{path: /metrics}", "{path: /other}")), previous=same
    )
    assert changed.data_sources is not same.data_sources
    (source,) = changed.data_sources
    assert getattr(source, "path") == "/other"  # noqa: B009
    assert [e.name for e in source.extractors] == ["core-metrics-extractor", "depth"]
    (old_source,) = same.data_sources
    assert len(old_source.extractors) == 2  # the running pipeline was not touched


def test_registry_lists_every_design_plugin_type() -> None:
    design = {
        "single-profile-handler",
        "max-score-picker",
        "random-picker",
        "weighted-random-picker",
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "running-requests-size-scorer",
        "lora-affinity-scorer",
        "prefix-cache-scorer",
        "approx-prefix-cache-producer",
        "metric-scorer",
        "header-based-testing-filter",
        "metrics-data-source",
        "prometheus-data-source",
        "core-metrics-extractor",
        "prometheus-metric",
        "multi-profile-handler",
    }
    assert design <= set(registry.plugin_types())
    assert custom_metrics.PROMETHEUS_METRIC in registry.plugin_types()


# Every parameter each plugin documents, with a valid value; a config declaring the plugin
# with all of them must load.
DOCUMENTED_PARAMETERS: dict[str, dict[str, object]] = {
    "single-profile-handler": {},
    "multi-profile-handler": {"primaryProfile": "default", "fallback": True},
    "max-score-picker": {"maxNumOfEndpoints": 2},
    "random-picker": {"maxNumOfEndpoints": 2},
    "weighted-random-picker": {"maxNumOfEndpoints": 2},
    "header-based-testing-filter": {"headerName": "x-test-endpoints"},
    "queue-scorer": {"countPendingDispatches": True},
    "kv-cache-utilization-scorer": {},
    "running-requests-size-scorer": {},
    "lora-affinity-scorer": {},
    "prefix-cache-scorer": {
        "prefixMatchInfoProducerName": "approx-prefix-cache-producer",
        "minBlocksForFullScore": 8,
    },
    "approx-prefix-cache-producer": {
        "blockSizeTokens": 16,
        "maxPrefixBlocksToMatch": 256,
        "lruCapacityPerServer": 31250,
        "autoTune": False,
    },
    "metric-scorer": {
        "metricName": "depth",
        "min": 0,
        "max": 10,
        "direction": "higher-is-better",
        "defaultValue": 5,
    },
    "metrics-data-source": {
        "scheme": "https",
        "path": "/metrics",
        "insecureSkipVerify": True,
        "maxBodyBytes": 1 << 20,
    },
    "prometheus-data-source": {"path": "/m"},
    "core-metrics-extractor": {
        "defaultEngine": "vllm",
        "engines": {
            "trt": {
                "waiting": "a",
                "running": ["b"],
                "kvUsage": "c",
                "loraInfo": "d",
                "cacheInfo": "e",
                "cacheBlockSizeLabel": "bs",
                "cacheNumBlocksLabel": "nb",
            }
        },
    },
    "prometheus-metric": {"selector": 'q{a="b"}', "metricName": "depth", "aggregation": "max"},
    "kv-events-data-source": {
        "mode": "bind",
        "bindAddress": "tcp://*:5557",
        "topic": "kv@",
        "maxMessagesPerTick": 100,
        "port": 5557,
        "portAnnotation": "example.com/kv-port",
    },
    "kv-events-extractor": {"maxBlocksPerServer": 1000},
    "precise-prefix-cache-producer": {
        "tokenizers": {"m": "/tokenizers/m"},
        "loraAdapters": {"a": "m"},
        "kvEventsExtractorName": "kv-events-extractor",
        "maxPrefixBlocksToMatch": 64,
        "inlineTokenizeChars": 0,
    },
    "precise-prefix-cache-scorer": {
        "prefixMatchInfoProducerName": "precise-prefix-cache-producer",
        "minBlocksForFullScore": 8,
    },
}
_KV_EVENTS = {
    "sources": [
        {
            "pluginRef": "metrics-data-source",
            "extractors": [{"pluginRef": "core-metrics-extractor"}],
        },
        {
            "pluginRef": "kv-events-data-source",
            "extractors": [{"pluginRef": "kv-events-extractor"}],
        },
    ]
}


@pytest.mark.parametrize("type_name", sorted(DOCUMENTED_PARAMETERS))
def test_documented_parameters_load(type_name: str) -> None:
    plugins: list[dict[str, object]] = [
        {"type": type_name, "parameters": DOCUMENTED_PARAMETERS[type_name]}
    ]
    refs: list[dict[str, object]] = [{"pluginRef": "queue-scorer"}]
    data: dict[str, object] = {}
    if type_name != "queue-scorer":
        plugins.append({"type": "queue-scorer"})
    kind_of_plugin = registry.create(type_name, "probe", DOCUMENTED_PARAMETERS[type_name])
    if section.is_source(kind_of_plugin):
        data = {
            "sources": [
                {"pluginRef": type_name, "extractors": [{"pluginRef": "core-metrics-extractor"}]}
            ]
        }
    elif section.is_extractor(kind_of_plugin):
        data = {
            "sources": [
                {"pluginRef": "metrics-data-source", "extractors": [{"pluginRef": type_name}]}
            ]
        }
    elif not type_name.endswith("-handler") and type_name != "queue-scorer":
        refs.append({"pluginRef": type_name})
    if type_name.startswith(("kv-events-", "precise-prefix-")):
        data = _KV_EVENTS  # a KV-event source feeds only the KV-event extractor
    if type_name == "metric-scorer":
        plugins.append(
            {"type": "prometheus-metric", "name": "depth", "parameters": {"selector": "q"}}
        )
        data = {
            "sources": [
                {
                    "pluginRef": "metrics-data-source",
                    "extractors": [{"pluginRef": "core-metrics-extractor"}, {"pluginRef": "depth"}],
                }
            ]
        }
    document: dict[str, object] = {
        "plugins": plugins,
        "schedulingProfiles": [{"name": "default", "plugins": refs}],
    }
    if data:
        document["dataLayer"] = data
    config = load_config(cfg(yaml.safe_dump(document)))
    assert getattr(config.plugins[type_name], "type_name") == type_name  # noqa: B009


def test_documented_parameters_cover_every_scheduling_and_data_layer_type() -> None:
    """Flow control and the parsers document their own plugins."""
    ours = {
        type_name
        for type_name in registry.plugin_types()
        if type(
            registry.create(type_name, "probe", DOCUMENTED_PARAMETERS.get(type_name))
        ).__module__.startswith(("epp.scheduling.", "epp.datalayer."))
    }
    assert ours == set(DOCUMENTED_PARAMETERS)
