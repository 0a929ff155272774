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

    .venv/bin/python -m bench.latency_predictor          # ~3 minutes
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
                    }
                )
            original(tracker, request, target, response)

        slo_tracker.SloRequestTracker.response_complete = response_complete  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        slo_tracker.SloRequestTracker.response_complete = self._original  # type: ignore[method-assign]


async def record(requests: int, rate: float) -> list[dict[str, Any]]:
    with Recorder() as recorder:
        async with AsyncExitStack() as stack:
            backends = await stack.enter_async_context(simulators(4, SIM_ARGS))
            picker = Picker(
                PickerOptions(
                    host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0,
                    endpoints=",".join(backends), secure_serving=False,
                    config_text=CONFIG.read_text(), response_sample_rate=1.0,
                )
            )  # fmt: skip
            await picker.start()
            stack.push_async_callback(picker.stop)
            options = gateway_settings.GatewayOptions(picker_port=picker.grpc_port)
            envoy = await stack.enter_async_context(EnvoyProcess(options))
            plan = runner.LoadPlan(url=envoy.url, requests=requests, rate=rate, seed=3)
            results = await runner.run_load(plan, workloads.generate(workload(3)))
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


def compare_families(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    x = np.array([r["features"] for r in records])
    y = np.array([r["actual_s"] for r in records])
    keys = [r["endpoint"] for r in records]
    split = int(len(records) * 0.7)
    out: dict[str, dict[str, float]] = {}

    def score(name: str, predict: Any, batch: Any) -> None:
        predicted = np.maximum(predict(x[split:], keys[split:]), 1e-3)
        result = errors(list(zip(predicted.tolist(), y[split:].tolist(), strict=True)))
        started = time.perf_counter()
        for _ in range(200):
            batch()
        result["predict_us_8_candidates"] = (time.perf_counter() - started) / 200 * 1e6
        out[name] = result

    stats = SufficientStatistics(x.shape[1], decay=1.0)
    for key in set(keys[:split]):
        rows = [i for i in range(split) if keys[i] == key]
        stats.add(key, x[rows], y[rows])
    ours = stats.solve()
    probe_keys, probe = keys[split : split + 8], x[split : split + 8]
    score(
        "per-endpoint non-negative ridge (picker)",
        lambda xs, ks: ours.predict(ks, xs),
        lambda: ours.predict(probe_keys, probe),
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
    args = parser.parse_args()
    if args.cost_only:
        print_cost()
        return
    records = asyncio.run(record(args.requests, args.rate))
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
    print_cost()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latency_predictor.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "latency_predictor_records.json").write_text(json.dumps(records))


if __name__ == "__main__":
    main()
