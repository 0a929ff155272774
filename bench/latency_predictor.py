"""The latency predictor: how accurate, how it learns, what it costs, and why this model.

1. **Online accuracy.** A heterogeneous pool (4 simulated servers, two at 0.4x speed) behind
   Envoy and an in-process picker with the predicted-latency config; a skewed shared-prefix
   workload at about 80% of capacity. For every request the picker routes, the prediction
   for the chosen endpoint is paired with the TTFT measured on the response. Reported:
   MAPE and the 90th percentile of the absolute percentage error, per 100 samples learned.
2. **Model families**, offline on the same recorded requests (features of the chosen
   endpoint, its identity, the measured TTFT), trained on the first 70% in arrival order
   and tested on the rest: the picker's model (per-endpoint non-negative ridge shrunk to a
   pooled model), a pooled linear model, and scikit-learn's gradient-boosted trees (with
   the endpoint as a feature), with their prediction cost for one request's candidates.
3. **Prediction cost** of `latency-predictor` for 10 and 100 candidates (p50, p99).

`--workload mixed` records instead `bench.slo_routing`'s mixed workload (interactive turns
with a tight TTFT objective beside long batch documents) through the slo-aware config, and
reports errors per class: the interactive turns' error on the slow servers decides whether
slo-aware finds a server that meets their objective.

    .venv/bin/python -m bench.latency_predictor                  # ~3 minutes
    .venv/bin/python -m bench.latency_predictor --workload mixed --rate 3.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench import slo_routing
from bench.harness import simulators
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import Endpoint, EndpointKey
from epp.picker import Picker, PickerOptions
from epp.scheduling.interfaces import Candidate, SchedulingRequest
from epp.scheduling.plugins.prefix_producer import PrefixMatch
from epp.slo import features
from epp.slo import tracker as slo_tracker
from epp.slo.model import SufficientStatistics
from epp.slo.predictor import LatencyPrediction, LatencyPredictor, PredictorSettings
from sluice.gateway import settings as gateway_settings
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.loadgen import runner, summary, workloads

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIG = HERE.parent / "docs" / "configs" / "predicted-latency.yaml"
MIXED_CONFIG = HERE.parent / "docs" / "configs" / "slo-aware.yaml"
SIM_ARGS = [
    "--max-num-seqs", "4",
    "--time-to-first-token", "20",
    "--prefill-time-per-token", "0.5",
    "--inter-token-latency", "20",
    "--kv-cache-size", "600",
    "--replica-speeds", "1,0.4",
]  # fmt: skip


def workload(seed: int) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(
        kind="shared-prefix", groups=24, prefix_tokens=600, question_tokens=60,
        max_tokens=16, prefix_skew=1.0, seed=seed,
    )  # fmt: skip


class Recorder:
    """Wraps the tracker's completion hook to pair predictions with measurements."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._original = slo_tracker.SloRequestTracker.response_complete

    def __enter__(self) -> Recorder:
        recorder, original = self, self._original

        def response_complete(tracker: Any, request: Any, target: Any, response: Any) -> None:
            tracked = request.plugin_data.get(tracker.name)
            prediction = request.plugin_data.get("latency-predictor")
            if (
                tracked is not None
                and isinstance(prediction, LatencyPrediction)
                and response.ttft_s is not None
                and response.streaming
                and 200 <= response.status < 300
            ):
                row = prediction.row_of(tracked.key)
                recorder.records.append(
                    {
                        "endpoint": str(tracked.key),
                        "features": [float(x) for x in tracked.ttft_row],
                        "predicted_s": float(prediction.ttft_s[row]) if row is not None else None,
                        "warm": prediction.warm,
                        "samples": prediction.predictor.samples,
                        "actual_s": response.ttft_s,
                        "slo_ttft_ms": request.slo.ttft_ms if request.slo else None,
                    }
                )
            original(tracker, request, target, response)

        slo_tracker.SloRequestTracker.response_complete = response_complete  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        slo_tracker.SloRequestTracker.response_complete = self._original  # type: ignore[method-assign]


async def record(requests: int, rate: float, mixed: bool = False) -> list[dict[str, Any]]:
    config = MIXED_CONFIG if mixed else CONFIG
    stream = (
        slo_routing.mixed_workload(3, slo_ms=300.0, batch_slo_ms=3000.0)
        if mixed
        else workloads.generate(workload(3))
    )
    with Recorder() as recorder:
        async with AsyncExitStack() as stack:
            sim_args = slo_routing.SIM_ARGS if mixed else SIM_ARGS
            backends = await stack.enter_async_context(simulators(4, sim_args))
            picker = Picker(
                PickerOptions(
                    host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0,
                    endpoints=",".join(backends), secure_serving=False,
                    config_text=config.read_text(), response_sample_rate=1.0,
                )
            )  # fmt: skip
            await picker.start()
            stack.push_async_callback(picker.stop)
            options = gateway_settings.GatewayOptions(picker_port=picker.grpc_port)
            envoy = await stack.enter_async_context(EnvoyProcess(options))
            plan = runner.LoadPlan(url=envoy.url, requests=requests, rate=rate, seed=3)
            results = await runner.run_load(plan, stream)
            print(summary.table([("recorded run", summary.summarise(results))]))
    return recorder.records


def errors(pairs: list[tuple[float, float]]) -> dict[str, float]:
    ape = sorted(abs(p - a) / a for p, a in pairs if a > 0)
    return {
        "mape": statistics.mean(ape),
        "p90_ape": ape[int(0.9 * (len(ape) - 1))],
        "n": len(ape),
    }


def learning_curve(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    rows = []
    warm = [r for r in records if r["warm"] and r["predicted_s"] is not None]
    for start in range(0, len(warm), 100):
        chunk = warm[start : start + 100]
        if len(chunk) < 30:
            break
        result = errors([(r["predicted_s"], r["actual_s"]) for r in chunk])
        rows.append({"samples_learned": chunk[0]["samples"], **result})
    return rows


def compare_families(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    x = np.array([r["features"] for r in records])
    y = np.array([r["actual_s"] for r in records])
    keys = [r["endpoint"] for r in records]
    split = int(len(records) * 0.7)
    out: dict[str, dict[str, Any]] = {}

    classes = [_class_of(r) for r in records[split:]]

    def score(name: str, predict: Any, batch: Any) -> None:
        predicted = np.maximum(predict(x[split:], keys[split:]), 1e-3)
        pairs = list(zip(predicted.tolist(), y[split:].tolist(), strict=True))
        result: dict[str, Any] = errors(pairs)
        started = time.perf_counter()
        for _ in range(200):
            batch()
        result["predict_us_8_candidates"] = (time.perf_counter() - started) / 200 * 1e6
        by_class: dict[str, list[tuple[float, float]]] = {}
        for label, pair in zip(classes, pairs, strict=True):
            by_class.setdefault(label, []).append(pair)
        result["by_class"] = {
            label: {**errors(group), "bias": statistics.mean(p - a for p, a in group)}
            for label, group in sorted(by_class.items())
        }
        out[name] = result

    stats = SufficientStatistics(x.shape[1], decay=1.0)
    for key in set(keys[:split]):
        rows = [i for i in range(split) if keys[i] == key]
        stats.add(key, x[rows], y[rows])
    ours = stats.solve()
    probe_keys, probe = keys[split : split + 8], x[split : split + 8]
    score(
        "per-endpoint non-negative ridge, shrunk to the pool's model at the endpoint's speed "
        "(picker)",
        lambda xs, ks: ours.predict(ks, xs),
        lambda: ours.predict(probe_keys, probe),
    )
    unscaled = stats.solve(scaled_prior=False)
    score(
        "per-endpoint non-negative ridge, shrunk to the pooled model (until 2026-12-03)",
        lambda xs, ks: unscaled.predict(ks, xs),
        lambda: unscaled.predict(probe_keys, probe),
    )
    pooled = np.linalg.lstsq(x[:split], y[:split], rcond=None)[0]
    score("pooled least squares", lambda xs, ks: xs @ pooled, lambda: probe @ pooled)
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError:
        print("scikit-learn not installed: no gradient-boosting comparison")
        return out
    ids = {key: i for i, key in enumerate(sorted(set(keys)))}
    with_id = np.column_stack([x, [ids[k] for k in keys]])
    model = HistGradientBoostingRegressor(max_iter=200, categorical_features=[x.shape[1]])
    model.fit(with_id[:split], y[:split])
    score(
        "gradient-boosted trees (scikit-learn)",
        lambda xs, ks: model.predict(with_id[split:]),
        lambda: model.predict(with_id[split : split + 8]),
    )
    return out


def _class_of(record: dict[str, Any]) -> str:
    """The request's objective and its endpoint: where the errors matter differs."""
    slo = record.get("slo_ttft_ms")
    objective = f"TTFT <= {slo:.0f} ms" if slo else "no objective"
    return f"{objective} on {record['endpoint']}"


def prediction_cost(
    candidates: int, requests: int = 2000, shared_prefix: bool = False
) -> dict[str, float]:
    """`shared_prefix`: half the candidates hold the prompt's 64-block prefix and 32
    requests sharing it are in flight, so every prediction takes the amortized-miss path
    (a second model evaluation and the sharing count)."""
    rng = random.Random(1)
    predictor = LatencyPredictor(settings=PredictorSettings(min_samples=1))
    cands = [
        Candidate(
            Endpoint(EndpointKey(f"e{i}"), f"pod{i}", "ns", f"10.0.{i // 250}.{i % 250}", 8000),
            EndpointMetrics(waiting_queue_size=rng.randrange(5), updated_at=1.0),
        )
        for i in range(candidates)
    ]
    stats = SufficientStatistics(len(features.TTFT_FEATURES), decay=1.0)
    for c in cands:  # a trained model with coefficients for every endpoint
        stats.add(
            c.endpoint.key,
            np.abs(np.random.default_rng(1).normal(size=(20, 5))),
            np.abs(np.random.default_rng(2).normal(size=20)),
        )
    predictor._ttft = stats.solve()
    hashes = list(range(1, 65))
    match = PrefixMatch(hashes, {c.endpoint.key: 64 for c in cands[::2]}, 64)
    if shared_prefix:
        for n in range(32):
            predictor.in_flight.add(cands[0].endpoint.key, -n, 40, 0.0, hashes)
    samples = []
    for n in range(requests):
        request = SchedulingRequest(str(n), "m", prompt_text="x" * 4000)
        if shared_prefix:
            request.plugin_data[predictor.settings.prefix_producer] = match
        started = time.perf_counter()
        predictor.produce(request, cands)
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return {"p50_us": samples[len(samples) // 2], "p99_us": samples[int(len(samples) * 0.99)]}


def print_cost() -> None:
    print("\nprediction cost (latency-predictor.produce, all candidates):")
    print("| candidates | prefix | p50 µs | p99 µs |\n|---|---|---|---|")
    for n in (10, 100):
        for shared in (False, True):
            row = prediction_cost(n, shared_prefix=shared)
            prefix = "held by half, shared by 32 in flight" if shared else "none"
            print(f"| {n} | {prefix} | {row['p50_us']:.0f} | {row['p99_us']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=900)
    parser.add_argument("--rate", type=float, default=5.0, help="about 80% of the pool")
    parser.add_argument("--cost-only", action="store_true", help="only part 3, no servers")
    parser.add_argument("--workload", choices=("shared-prefix", "mixed"), default="shared-prefix")
    parser.add_argument(
        "--records", type=Path, help="compare model families on a run recorded earlier"
    )
    args = parser.parse_args()
    if args.records and not args.records.is_file():
        parser.error(f"--records: no file {args.records}")
    if args.cost_only:
        print_cost()
        return
    suffix = "_mixed" if args.workload == "mixed" else ""
    if args.records:
        records = json.loads(args.records.read_text())
    else:
        records = asyncio.run(record(args.requests, args.rate, args.workload == "mixed"))
    results: dict[str, Any] = {
        "learning_curve": learning_curve(records),
        "families": compare_families(records),
        "cost": {n: prediction_cost(n) for n in (10, 100)},
    }
    print("\nonline accuracy, per 100 warm predictions:")
    print("| samples learned | MAPE | p90 APE |\n|---|---|---|")
    for row in results["learning_curve"]:
        print(f"| {row['samples_learned']} | {row['mape']:.0%} | {row['p90_ape']:.0%} |")
    print("\nmodel families (train on the first 70%, test on the rest):")
    print("| model | MAPE | p90 APE | predict µs (8 candidates) |\n|---|---|---|---|")
    for name, row in results["families"].items():
        print(
            f"| {name} | {row['mape']:.0%} | {row['p90_ape']:.0%} | "
            f"{row['predict_us_8_candidates']:.0f} |"
        )
    print("\nper class (test part): n, MAPE, p90 APE, mean error (predicted - measured)")
    for name, row in results["families"].items():
        print(name)
        for label, e in row["by_class"].items():
            print(
                f"  {label}: {e['n']}, {e['mape']:.0%}, {e['p90_ape']:.0%}, "
                f"{e['bias'] * 1000:+.0f} ms"
            )
    print_cost()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"latency_predictor{suffix}.json").write_text(json.dumps(results, indent=2))
    if not args.records:
        path = RESULTS / f"latency_predictor_records{suffix}.json"
        path.write_text(json.dumps(records))


if __name__ == "__main__":
    main()
