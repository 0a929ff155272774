"""Label values clients choose cannot grow the picker's metric series without bound."""

from __future__ import annotations

import asyncio
import random

import grpc
import orjson
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp import cardinality, metrics
from tests.extproc.test_robustness import SHIPPED
from tests.support.backends import backends
from tests.support.extproc_client import (
    ExtProcClient,
    completion_headers,
    request_body,
    request_headers,
    response_headers,
)
from tests.support.picker import fresh_metrics, running_picker, wait_for

FLOW_CONTROL = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
saturationDetector: {queueDepthThreshold: 1000, metricsStalenessThreshold: 5s}
"""

# The documented bound (docs/configuration.md, "Metric series are bounded"), in series:
# ~140 per objective label set (a counter and five histograms), one per error label set,
# three per workload; plus the picker's fixed series (a few hundred).
SERIES_PER_OBJECTIVE_SET = 140
BOUND = (
    (metrics.MAX_OBJECTIVE_LABEL_SETS + 1) * SERIES_PER_OBJECTIVE_SET
    + metrics.MAX_ERROR_LABEL_SETS
    + 1
    + 3 * metrics.MAX_WORKLOAD_SERIES
    + 1_000
)


def series() -> dict[str, list[dict[str, str]]]:
    text = generate_latest(metrics.REGISTRY).decode()
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample.labels)
    return found


def count(found: dict[str, list[dict[str, str]]]) -> int:
    return sum(len(v) for v in found.values())


async def hostile_request(client: ExtProcClient, rng: random.Random, index: int) -> None:
    model = "m" if index % 10 == 0 else f"model-{rng.getrandbits(64):x}"
    workload = orjson.dumps({"workload_id": f"w-{rng.getrandbits(64):x}", "criticality": 3})
    call = client.open()
    try:
        headers = completion_headers(**{"x-workload-context": workload.decode()})
        await call.write(request_headers(headers, **SHIPPED))
        await call.read()
        await call.write(request_body(orjson.dumps({"model": model, "prompt": "hi"})))
        routed = await call.read()
        assert routed.WhichOneof("response") == "request_body", routed
        status = rng.choice((200, 200, 404, 418, 503, 599))
        await call.write(response_headers(status, "application/json"))
        await call.read()
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    finally:
        call.cancel()


async def test_ten_thousand_random_models_and_workloads_stay_under_the_bound():
    async with backends(["127.0.0.2", "127.0.0.3"]) as servers:
        endpoints = ",".join(s.target for s in servers)
        async with running_picker(endpoints=endpoints, config_text=FLOW_CONTROL) as picker:
            await fresh_metrics(picker)
            client = ExtProcClient(picker.grpc_port)
            rng = random.Random(14)
            semaphore = asyncio.Semaphore(32)

            async def run(index: int) -> None:
                async with semaphore:
                    await hostile_request(client, rng, index)

            await asyncio.gather(*(run(i) for i in range(2_000)))
            after_2k = count(series())
            await asyncio.gather(*(run(i) for i in range(2_000, 10_000)))
            await wait_for(
                lambda: picker.server.processor.open_streams == 0, timeout_s=30, what="closed"
            )
            await client.close()
            found = series()

    total = count(found)
    assert total <= BOUND, f"{total} series, bound {BOUND}"
    assert total - after_2k < 50  # flat once the limits are reached
    # (The registry is the process's: other tests' label sets may be there too.)
    models = {labels["model_name"] for labels in found["inference_objective_request_total"]}
    assert {"m", cardinality.OVERFLOW} <= models  # the served model keeps its own label
    assert not [m for m in models if m.startswith("model-")]
    errors = {labels["error_code"] for labels in found["inference_objective_request_error_total"]}
    assert {"upstream_404", "upstream_503", "upstream_4xx", "upstream_5xx"} <= errors
    assert not {"upstream_418", "upstream_599"} & errors
    workloads = found.get("workload_total_requests", [])
    assert len([w for w in workloads if w["workload_id"].startswith("w-")]) <= (
        metrics.MAX_WORKLOAD_SERIES
    )
    overflow = {
        labels["kind"]: labels
        for labels in found["inference_extension_metric_labels_overflow_total"]
    }
    assert {"model", "workload"} <= overflow.keys()
    assert picker.in_flight.in_flight == 0


def test_label_sets_fold_beyond_the_limit_and_free_idle_ones():
    sets = cardinality.LabelSets(2, ("other",))
    assert sets.admit(("a",), now=0.0) == ("a",)
    assert sets.admit(("b",), now=1.0) == ("b",)
    assert sets.admit(("c",), now=2.0) == ("other",)
    assert sets.overflowed == 1
    assert sets.admit(("a",), now=3.0) == ("a",)  # live sets stay themselves
    assert sorted(sets.idle(now=2.5, idle_s=1.0)) == [("b",)]  # "a" was used at 3.0
    assert sets.admit(("c",), now=4.0) == ("c",)  # room again


def test_known_models_recompute_once_when_stale():
    known = cardinality.KnownModels(limit=2)
    calls = []

    def source() -> list[str]:
        calls.append(1)
        return ["b", "a", "c"]

    known.source = source
    assert known.label("a") == cardinality.OVERFLOW  # not stale: no recomputation
    known.mark_stale()
    assert known.label("a") == "a"
    assert known.label("c") == cardinality.OVERFLOW  # beyond the limit: first two by name
    assert known.label("zzz") == cardinality.OVERFLOW
    assert len(calls) == 1


def test_upstream_statuses_fold_to_a_fixed_set():
    assert cardinality.upstream_error_code(503) == "upstream_503"
    assert cardinality.upstream_error_code(599) == "upstream_5xx"
    assert cardinality.upstream_error_code(418) == "upstream_4xx"
