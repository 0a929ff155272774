from __future__ import annotations

import textwrap

import pytest

from epp.config import loader, registry
from epp.config.loader import ConfigError, load_config
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.prefix_scorer import SelfIndexingPrefixCacheScorer
from epp.scheduling.plugins.profile_handler import SingleProfileHandler
from tests.scheduling.builders import candidate, request
from tests.support.text import replaced

HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def cfg(body: str) -> str:
    return HEADER + textwrap.dedent(body)


def _shape(config: loader.PickerConfig) -> dict[str, dict[str, object]]:
    return {
        name: {
            "filters": [f.name for f in p.filters],
            "scorers": [(w.scorer.name, w.weight) for w in p.scorers],
            "producers": [x.name for x in p.producers],
            "picker": p.picker.name,
        }
        for name, p in config.scheduler.profiles.items()
    }


DEFAULT_SHAPE = {
    "default": {
        "filters": [],
        "scorers": [
            ("queue-scorer", 2.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("prefix-cache-scorer", 3.0),
        ],
        "producers": ["approx-prefix-cache-producer"],
        "picker": "max-score-picker",
    }
}


@pytest.mark.parametrize("text", [None, "", "  \n", "# only a comment\n"])
def test_default_config(text: str | None) -> None:
    config = load_config(text)
    assert _shape(config) == DEFAULT_SHAPE
    assert isinstance(config.scheduler.handler, SingleProfileHandler)
    assert [p.name for p in config.lifecycle.pre_request_plugins] == [
        "approx-prefix-cache-producer",
        "in-flight-tracker",
    ]
    assert config.lifecycle.response_complete_plugins == (config.in_flight,)
    assert config.feature_gates == frozenset()
    assert config.parser_ref == config.parser_type == "openai-parser"
    assert config.data_layer is None and config.flow_control is None


def test_default_config_schedules_end_to_end() -> None:
    scheduler = load_config(None).scheduler
    cands = [candidate("busy", waiting_queue_size=9, kv_cache_usage=0.9), candidate("idle")]
    req = request("hello " * 100)
    result = scheduler.schedule(req, cands)
    assert result.primary is not None
    assert result.primary.targets[0].endpoint.pod_name == "idle"


FULL_EXAMPLE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:                       # name defaults to type; names unique
- {type: queue-scorer}
- {name: fast-prefix, type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 16}}
- {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: fast-prefix}}
- {type: kv-cache-utilization-scorer}
- {type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
saturationDetector: {pluginRef: utilization-detector}
dataLayer:
  sources: [{pluginRef: metrics-data-source, extractors: [{pluginRef: core-metrics-extractor}]}]
flowControl: {maxRequests: 100}
parser: {pluginRef: openai-parser}
"""


def test_full_example() -> None:
    config = load_config(FULL_EXAMPLE)
    assert config.feature_enabled("flowControl")
    assert _shape(config) == {
        "default": {
            # With flowControl on, profiles first keep the endpoints with room.
            "filters": ["utilization-detector"],
            "scorers": [
                ("queue-scorer", 2.0),
                ("kv-cache-utilization-scorer", 2.0),
                ("prefix-cache-scorer", 3.0),
            ],
            "producers": ["fast-prefix"],  # wired from the scorer's parameter
            "picker": "max-score-picker",
        }
    }
    picker = config.plugins["max-score-picker"]
    assert isinstance(picker, MaxScorePicker) and picker.max_endpoints == 2
    assert "approx-prefix-cache-producer" not in config.plugins  # no default producer added
    assert config.saturation_detector is config.plugins["utilization-detector"]
    assert config.flow_control is not None and config.flow_control.max_requests == 100
    assert config.data_layer == {
        "sources": [
            {
                "pluginRef": "metrics-data-source",
                "extractors": [{"pluginRef": "core-metrics-extractor"}],
            }
        ]
    }
    assert config.parser_type == "openai-parser"


def test_llm_d_api_version_and_data_section() -> None:
    config = load_config(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\ndata: {sources: []}\n"
    )
    assert config.data_layer == {"sources": []}
    assert _shape(config) == DEFAULT_SHAPE


def test_declared_parser_plugin() -> None:
    config = load_config(
        cfg("""
        plugins: [{name: raw, type: passthrough-parser}]
        parser: {pluginRef: raw}
    """)
    )
    assert config.parser_ref == "raw" and config.parser_type == "passthrough-parser"
    assert isinstance(config.plugins["raw"], registry.ParserDeclaration)
    assert _shape(config) == DEFAULT_SHAPE


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "featureGate: [flowControl]\n",
            "unknown key 'featureGate' in EndpointPickerConfig (did you mean 'featureGates'?)",
        ),
        (
            "datalayer: {}\n",
            "unknown key 'datalayer' in EndpointPickerConfig (did you mean 'dataLayer'?)",
        ),
        (
            "plugins: [{type: queue-scorer, parameter: {}}]\n",
            "unknown key 'parameter' in plugins[0] (did you mean 'parameters'?)",
        ),
        (
            "schedulingProfiles: [{name: p, plugins: [{pluginref: queue-scorer}]}]\n",
            "unknown key 'pluginref' in schedulingProfiles[0].plugins[0] "
            "(did you mean 'pluginRef'?)",
        ),
        (
            "schedulingProfiles: [{name: p, plugin: []}]\n",
            "unknown key 'plugin' in schedulingProfiles[0] (did you mean 'plugins'?)",
        ),
        (
            "parser: {pluginREF: openai-parser}\n",
            "unknown key 'pluginREF' in parser (did you mean 'pluginRef'?)",
        ),
        ("zzz: 1\n", "unknown key 'zzz' in EndpointPickerConfig (allowed: apiVersion"),
    ],
)
def test_typo_keys_name_path_and_suggestion(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(cfg(body))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: EndpointPickerConfig\n", "apiVersion missing; expected one of"),
        ("apiVersion: v1\nkind: EndpointPickerConfig\n", "apiVersion is 'v1'"),
        ("apiVersion: llm-d.ai/v1alpha1\nkind: ConfigMap\n", "kind is 'ConfigMap'"),
        ("- a\n- b\n", "EndpointPickerConfig: must be a mapping, got a list"),
        ("a: [\n", "invalid YAML at line"),
        (HEADER + "plugins: []\nplugins: []\n", "duplicate key 'plugins' at line 4"),
    ],
)
def test_document_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(text)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # unknown plugin type, with a suggestion
        (
            "plugins: [{type: queue-scorrer}]\n",
            "plugins[0].type: unknown plugin type 'queue-scorrer' (did you mean 'queue-scorer'?)",
        ),
        ("plugins: [{name: x}]\n", "plugins[0]: missing required key 'type'"),
        # dangling references
        (
            "plugins: [{type: queue-scorer}]\n"
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorr}]}]\n",
            "schedulingProfiles[0].plugins[0].pluginRef: no plugin named 'queue-scorr' is "
            "declared under plugins (did you mean 'queue-scorer'?)",
        ),
        (
            "plugins: [{type: prefix-cache-scorer, "
            "parameters: {prefixMatchInfoProducerName: nowhere}}]\n",
            "plugins[0]: 'prefix-cache-scorer' reads data from producer 'nowhere', which is not "
            "declared under plugins",
        ),
        (
            "plugins: [{type: queue-scorer}, {name: p, type: prefix-cache-scorer, "
            "parameters: {prefixMatchInfoProducerName: queue-scorer}}]\n",
            "reads data from 'queue-scorer', which is not a data producer",
        ),
        (
            "parser: {pluginRef: opnai-parser}\n",
            "parser.pluginRef: no parser named 'opnai-parser' (did you mean 'openai-parser'?)",
        ),
        (
            "plugins: [{type: queue-scorer}]\nparser: {pluginRef: queue-scorer}\n",
            "parser.pluginRef: 'queue-scorer' is a queue-scorer, not a parser",
        ),
        # duplicate names
        (
            "plugins: [{type: queue-scorer}, {type: queue-scorer}]\n",
            "plugins[1]: plugin name 'queue-scorer' is already used by plugins[0]",
        ),
        (
            "schedulingProfiles: [{name: a}, {name: a}]\n",
            "schedulingProfiles[1]: profile name 'a' is used twice",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: "
            "[{pluginRef: queue-scorer}, {pluginRef: queue-scorer}]}]\n",
            "schedulingProfiles[0].plugins[1]: plugin 'queue-scorer' is referenced twice in 'a'",
        ),
        # weights
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: "
            "[{pluginRef: queue-scorer, weight: -1}]}]\n",
            "schedulingProfiles[0].plugins[0].weight: must be a finite number >= 0, got -1",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: "
            "[{pluginRef: queue-scorer, weight: high}]}]\n",
            "schedulingProfiles[0].plugins[0].weight: must be a number >= 0, got a string 'high'",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: "
            "[{pluginRef: queue-scorer, weight: .inf}]}]\n",
            "must be a finite number >= 0, got inf",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: "
            "[{pluginRef: queue-scorer, weight: true}]}]\n",
            "got a boolean True",
        ),
        (
            "plugins: [{type: max-score-picker}]\nschedulingProfiles: [{name: a, plugins: "
            "[{pluginRef: max-score-picker, weight: 2}]}]\n",
            "schedulingProfiles[0].plugins[0].weight: 'max-score-picker' is not a scorer "
            "(picker); only scorers take a weight",
        ),
        # plugin parameters
        (
            "plugins: [{type: max-score-picker, parameters: {maxNumOfEndpoints: 0}}]\n",
            "plugins[0].parameters.maxNumOfEndpoints (max-score-picker 'max-score-picker'): "
            "must be at least 1, got 0",
        ),
        (
            "plugins: [{type: approx-prefix-cache-producer, parameters: {blockSizeToken: 8}}]\n",
            "plugins[0].parameters.blockSizeToken (approx-prefix-cache-producer "
            "'approx-prefix-cache-producer'): unknown parameter (did you mean 'blockSizeTokens'?)",
        ),
        (
            "plugins: [{type: approx-prefix-cache-producer, parameters: {autoTune: 1}}]\n",
            "plugins[0].parameters.autoTune (approx-prefix-cache-producer "
            "'approx-prefix-cache-producer'): must be true or false, got integer 1",
        ),
        (
            "plugins: [{type: queue-scorer, parameters: [1]}]\n",
            "plugins[0].parameters: must be a mapping, got a list",
        ),
        # sections
        ("dataLayer: {}\ndata: {}\n", "both 'dataLayer' and 'data' are set"),
        ("flowControl: [1]\n", "flowControl: must be a mapping, got a list"),
        (
            "featureGates: [flowcontrol]\n",
            "featureGates[0]: unknown feature gate 'flowcontrol' (did you mean 'flowControl'?)",
        ),
        ("schedulingProfiles: []\n", "schedulingProfiles: must list at least one profile"),
        ("plugins: {type: queue-scorer}\n", "plugins: must be a list, got a mapping"),
        (
            "plugins: [{type: queue-scorer, name: ''}]\n",
            "plugins[0].name: must be a non-empty string, got an empty string",
        ),
    ],
)
def test_config_errors(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(cfg(body))
    assert message in str(info.value)


def test_profile_composition_errors() -> None:
    two_pickers = cfg("""
        plugins:
        - {type: max-score-picker}
        - {name: other, type: max-score-picker}
        schedulingProfiles:
        - {name: a, plugins: [{pluginRef: max-score-picker}, {pluginRef: other}]}
    """)
    with pytest.raises(ConfigError, match="already has picker 'max-score-picker'"):
        load_config(two_pickers)

    handler_in_profile = cfg("""
        plugins: [{type: single-profile-handler}]
        schedulingProfiles: [{name: a, plugins: [{pluginRef: single-profile-handler}]}]
    """)
    with pytest.raises(ConfigError, match="is a profile handler"):
        load_config(handler_in_profile)

    parser_in_profile = cfg("""
        plugins: [{type: openai-parser}]
        schedulingProfiles: [{name: a, plugins: [{pluginRef: openai-parser}]}]
    """)
    with pytest.raises(ConfigError, match="cannot run in a scheduling profile"):
        load_config(parser_in_profile)

    no_handler = cfg("""
        schedulingProfiles: [{name: a}, {name: b}]
    """)
    with pytest.raises(ConfigError, match="2 scheduling profiles need a profile handler"):
        load_config(no_handler)

    single_with_two = cfg("""
        plugins: [{type: single-profile-handler}]
        schedulingProfiles: [{name: a}, {name: b}]
    """)
    with pytest.raises(ConfigError, match="single-profile-handler runs exactly one profile"):
        load_config(single_with_two)

    default_name_taken = cfg("""
        plugins: [{name: max-score-picker, type: queue-scorer}]
        schedulingProfiles: [{name: a, plugins: [{pluginRef: max-score-picker}]}]
    """)
    with pytest.raises(ConfigError, match="needed for the default max-score-picker"):
        load_config(default_name_taken)


# -- defaults and wiring -----------------------------------------------------------------


def test_profile_without_picker_gets_max_score_picker_and_weight_defaults_to_one() -> None:
    config = load_config(
        cfg("""
        plugins: [{type: lora-affinity-scorer}]
        schedulingProfiles: [{name: lora, plugins: [{pluginRef: lora-affinity-scorer}]}]
    """)
    )
    assert _shape(config) == {
        "lora": {
            "filters": [],
            "scorers": [("lora-affinity-scorer", 1.0)],
            "producers": [],
            "picker": "max-score-picker",
        }
    }
    assert config.scheduler.schedule(request(), [candidate("a")]).primary_profile == "lora"


def test_prefix_scorer_gets_a_default_producer() -> None:
    config = load_config(
        cfg("""
        plugins: [{type: prefix-cache-scorer}]
        schedulingProfiles: [{name: p, plugins: [{pluginRef: prefix-cache-scorer, weight: 3}]}]
    """)
    )
    assert _shape(config)["p"] == {
        "filters": [],
        "scorers": [("prefix-cache-scorer", 3.0)],
        "producers": ["approx-prefix-cache-producer"],
        "picker": "max-score-picker",
    }
    assert isinstance(config.plugins["approx-prefix-cache-producer"], ApproxPrefixCacheProducer)


def test_legacy_combined_prefix_scorer() -> None:
    config = load_config(
        cfg("""
        plugins:
        - {type: prefix-cache-scorer, parameters: {blockSize: 64, lruCapacityPerServer: 100}}
        schedulingProfiles: [{name: p, plugins: [{pluginRef: prefix-cache-scorer}]}]
    """)
    )
    scorer = config.plugins["prefix-cache-scorer"]
    assert isinstance(scorer, SelfIndexingPrefixCacheScorer)
    assert _shape(config)["p"]["producers"] == ["prefix-cache-scorer"]
    assert list(config.plugins) == [
        "prefix-cache-scorer",
        "max-score-picker",
        "single-profile-handler",
        "metrics-data-source",
        "core-metrics-extractor",
        "in-flight-tracker",
    ]
    assert config.lifecycle.pre_request_plugins == (scorer, config.in_flight)


def test_no_profiles_with_declared_scorers_uses_them_all() -> None:
    config = load_config(
        cfg("""
        plugins: [{type: queue-scorer}, {type: lora-affinity-scorer}]
    """)
    )
    assert _shape(config) == {
        "default": {
            "filters": [],
            "scorers": [("queue-scorer", 1.0), ("lora-affinity-scorer", 1.0)],
            "producers": [],
            "picker": "max-score-picker",
        }
    }


def test_declared_producer_tunes_the_default_profile() -> None:
    config = load_config(
        cfg("""
        plugins:
        - {type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 32}}
    """)
    )
    assert _shape(config) == DEFAULT_SHAPE
    producer = config.plugins["approx-prefix-cache-producer"]
    assert isinstance(producer, ApproxPrefixCacheProducer)
    assert producer.settings.block_chars == 128


# -- reload ------------------------------------------------------------------------------


PRODUCER_CONFIG = """
    plugins:
    - {{name: fast-prefix, type: approx-prefix-cache-producer, parameters: {params}}}
    - {{type: prefix-cache-scorer, parameters: {{prefixMatchInfoProducerName: fast-prefix}}}}
    - {{type: queue-scorer}}
    schedulingProfiles:
    - name: default
      plugins: [{{pluginRef: prefix-cache-scorer, weight: {weight}}}, {{pluginRef: queue-scorer}}]
"""


def _learn(config: loader.PickerConfig) -> None:
    req = request("r" * 256)
    config.lifecycle.pre_request(req, config.scheduler.schedule(req, [candidate("a")]))


def test_reload_keeps_stateful_plugin_with_unchanged_settings() -> None:
    old = load_config(cfg(PRODUCER_CONFIG.format(params="{blockSizeTokens: 16}", weight=3)))
    _learn(old)
    old_producer = old.plugins["fast-prefix"]
    assert isinstance(old_producer, ApproxPrefixCacheProducer) and len(old_producer.index) == 1

    # Another scorer weight, same producer settings: the instance and its index carry over.
    new = load_config(
        cfg(PRODUCER_CONFIG.format(params="{blockSizeTokens: 16}", weight=5)), previous=old
    )
    assert new.plugins["fast-prefix"] is old_producer
    assert new.scheduler.profiles["default"].producers == (old_producer,)
    assert new.lifecycle.pre_request_plugins == (old_producer, new.in_flight)
    assert new.in_flight is old.in_flight  # in-flight counts survive reloads
    assert new.plugins["queue-scorer"] is not old.plugins["queue-scorer"]  # stateless: new
    req = request("r" * 256)
    new.scheduler.schedule(req, [candidate("a")])
    assert req.plugin_data["fast-prefix"].matched_blocks  # type: ignore[attr-defined]

    # Same effective settings written differently still count as unchanged.
    same = load_config(cfg(PRODUCER_CONFIG.format(params="{}", weight=5)), previous=new)
    assert same.plugins["fast-prefix"] is old_producer


def test_reload_replaces_stateful_plugin_when_settings_change() -> None:
    old = load_config(cfg(PRODUCER_CONFIG.format(params="{blockSizeTokens: 16}", weight=3)))
    new = load_config(
        cfg(PRODUCER_CONFIG.format(params="{blockSizeTokens: 32}", weight=3)), previous=old
    )
    assert new.plugins["fast-prefix"] is not old.plugins["fast-prefix"]


def test_reload_default_config_keeps_default_producer() -> None:
    old = load_config(None)
    new = load_config("", previous=old)
    assert (
        new.plugins["approx-prefix-cache-producer"] is old.plugins["approx-prefix-cache-producer"]
    )


def test_reload_does_not_reuse_across_names_or_types() -> None:
    old = load_config(cfg(PRODUCER_CONFIG.format(params="{}", weight=3)))
    renamed = load_config(
        cfg(replaced(PRODUCER_CONFIG, "fast-prefix", "slow-prefix").format(params="{}", weight=3)),
        previous=old,
    )
    assert renamed.plugins["slow-prefix"] is not old.plugins["fast-prefix"]


def test_invalid_reload_raises_and_leaves_the_old_config_usable() -> None:
    old = load_config(None)
    with pytest.raises(ConfigError):
        load_config(cfg("plugins: [{type: nope}]\n"), previous=old)
    _learn(old)


# Types that cannot work without some parameter, with the least they need.
REQUIRED_PARAMETERS: dict[str, dict[str, object]] = {
    "metric-scorer": {"metricName": "load"},
    "prometheus-metric": {"selector": "load"},
}


def test_every_registered_type_builds_with_default_parameters() -> None:
    for type_name in registry.plugin_types():
        plugin = registry.create(type_name, f"my-{type_name}", REQUIRED_PARAMETERS.get(type_name))
        assert getattr(plugin, "type_name") == type_name  # noqa: B009
        assert getattr(plugin, "name") == f"my-{type_name}"  # noqa: B009


def test_retain_endpoints_reaches_stateful_plugins() -> None:
    config = load_config(None)
    _learn(config)
    producer = config.plugins["approx-prefix-cache-producer"]
    assert isinstance(producer, ApproxPrefixCacheProducer) and len(producer.index) == 1
    config.retain_endpoints([candidate("a").endpoint.key])
    assert len(producer.index) == 1
    config.retain_endpoints([])
    assert len(producer.index) == 0
