"""Plugin types by the string a config's `type:` names, each with its factory.

A factory takes the plugin's name and its `parameters:` mapping (None when absent) and
returns a plugin instance, raising `ValueError` (usually a
`epp.parameters.ParameterError`) for bad parameters. Adding a plugin
means writing its module and adding one line to `_FACTORIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from epp import parameters
from epp.bodies import parsers
from epp.datalayer import custom_metrics, extractors, kv_event_extractor, kv_event_source, sources
from epp.flowcontrol import fairness, ordering, saturation, workload_aware
from epp.requestcontrol import inflight
from epp.scheduling.plugins import (
    header_filter,
    load_scorers,
    lora_affinity_scorer,
    max_score_picker,
    metric_scorer,
    precise_prefix,
    prefix_producer,
    prefix_scorer,
    profile_handler,
    random_pickers,
)
from epp.slo import predictor, tracker
from epp.slo import profile_handler as slo_profile_handler
from epp.slo import scorers as slo_scorers

PluginFactory = Callable[[str, Mapping[str, object] | None], object]


@dataclass(frozen=True, slots=True)
class ParserDeclaration:
    """A body parser declared under `plugins` (`openai-parser`, `passthrough-parser`).

    Parsers are built per request path by `epp.bodies.parsers`; the config only records
    which one the `parser:` section selects.
    """

    name: str
    type_name: str


def _parser_factory(type_name: str) -> PluginFactory:
    def create(name: str, params: Mapping[str, object] | None) -> ParserDeclaration:
        parameters.ParameterReader(params).finish()
        return ParserDeclaration(name, type_name)

    return create


def _source_factory(type_name: str) -> PluginFactory:
    def create(name: str, params: Mapping[str, object] | None) -> sources.MetricsDataSource:
        return sources.new_metrics_data_source(name, params, type_name)

    return create


# Flow-control policies by kind: the `flowControl` section looks up band policies here.
ORDERING_POLICIES: dict[str, PluginFactory] = {
    "fcfs-ordering-policy": ordering.FcfsOrderingPolicy.from_parameters,
    "edf-ordering-policy": ordering.EdfOrderingPolicy.from_parameters,
    "slo-deadline-ordering-policy": ordering.SloDeadlineOrderingPolicy.from_parameters,
    "workload-aware-ordering-policy": workload_aware.WorkloadAwareOrderingPolicy.from_parameters,
}
FAIRNESS_POLICIES: dict[str, PluginFactory] = {
    "global-strict-fairness-policy": fairness.GlobalStrictFairnessPolicy.from_parameters,
    "round-robin-fairness-policy": fairness.RoundRobinFairnessPolicy.from_parameters,
}

_FACTORIES: dict[str, PluginFactory] = {
    # profile handlers
    "single-profile-handler": profile_handler.SingleProfileHandler.from_parameters,
    "multi-profile-handler": profile_handler.MultiProfileHandler.from_parameters,
    # pickers
    "max-score-picker": max_score_picker.MaxScorePicker.from_parameters,
    "random-picker": random_pickers.RandomPicker.from_parameters,
    "weighted-random-picker": random_pickers.WeightedRandomPicker.from_parameters,
    # filters
    "header-based-testing-filter": header_filter.HeaderBasedTestingFilter.from_parameters,
    # scorers
    "queue-scorer": load_scorers.QueueScorer.from_parameters,
    "kv-cache-utilization-scorer": load_scorers.KvCacheUtilizationScorer.from_parameters,
    "running-requests-size-scorer": load_scorers.RunningRequestsSizeScorer.from_parameters,
    "lora-affinity-scorer": lora_affinity_scorer.LoraAffinityScorer.from_parameters,
    "prefix-cache-scorer": prefix_scorer.PrefixCacheScorer.from_parameters,
    "metric-scorer": metric_scorer.MetricScorer.from_parameters,
    "precise-prefix-cache-scorer": precise_prefix.PrecisePrefixCacheScorer.from_parameters,
    # data producers
    "approx-prefix-cache-producer": prefix_producer.ApproxPrefixCacheProducer.from_parameters,
    "precise-prefix-cache-producer": precise_prefix.PrecisePrefixCacheProducer.from_parameters,
    # data layer: sources and extractors
    **{type_name: _source_factory(type_name) for type_name in sources.TYPE_NAMES},
    "core-metrics-extractor": extractors.new_core_metrics_extractor,
    "prometheus-metric": custom_metrics.new_prometheus_metric_extractor,
    kv_event_source.TYPE_NAME: kv_event_source.new_kv_events_data_source,
    kv_event_extractor.TYPE_NAME: kv_event_extractor.KvEventsExtractor.from_parameters,
    # flow control: ordering and fairness policies, saturation detector (named in a
    # scheduling profile, a detector is also a filter)
    **ORDERING_POLICIES,
    **FAIRNESS_POLICIES,
    "utilization-detector": saturation.UtilizationDetector.from_parameters,
    # request lifecycle
    "in-flight-tracker": inflight.InFlightTracker.from_parameters,
    # SLO-aware and predicted-latency routing
    "latency-predictor": predictor.LatencyPredictor.from_parameters,
    "slo-request-tracker": tracker.SloRequestTracker.from_parameters,
    "latency-scorer": slo_scorers.LatencyScorer.from_parameters,
    "slo-scorer": slo_scorers.SloScorer.from_parameters,
    "slo-profile-handler": slo_profile_handler.SloProfileHandler.from_parameters,
    # request body parsers
    **{type_name: _parser_factory(type_name) for type_name in parsers.PARSERS},
}


def plugin_types() -> list[str]:
    """Every registered type string, sorted (for error messages and documentation)."""
    return sorted(_FACTORIES)


def factory(type_name: str) -> PluginFactory | None:
    return _FACTORIES.get(type_name)


def create(type_name: str, name: str, parameters: Mapping[str, object] | None = None) -> object:
    """Build a plugin; `KeyError` for an unknown type, `ValueError` for bad parameters."""
    return _FACTORIES[type_name](name, parameters)


def parser_types() -> list[str]:
    return sorted(parsers.PARSERS)
