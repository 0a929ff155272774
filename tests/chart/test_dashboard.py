"""The Grafana dashboard queries only metrics a real picker exposes.

A `sluice picker` process (its own metrics registry, nothing left over from other tests)
routes traffic from a real Envoy to simulated vLLM servers with the shipped `slo-aware`
preset plus flow control, so every family the dashboard shows has samples: pool gauges,
scheduling and plugin timings, errors, TTFT/TPOT, flow-control bands and workloads, the
latency predictor cold and warm, SLO misses, a config reload. Then every metric name in
every panel and template query must be in the picker's `/metrics` (model-server names,
`vllm:...`, in the simulators' `/metrics`, which mirror vLLM's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from sluice.gateway.ports import free_tcp_port
from sluice.sim import config as sim_config
from sluice.sim import engine
from sluice.sim.fleet import BackgroundFleet
from tests.chart import promql

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = REPO / "charts" / "sluice" / "dashboards" / "sluice.json"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))
MODEL_SERVER_PREFIX = "vllm:"

SIM = sim_config.SimConfig(
    model="sim-model",
    performance=engine.PerformanceModel(ttft_ms=5, prefill_ms_per_token=0.01, itl_ms=2),
)


def picker_config(*, queue_depth_threshold: int, predictor_min_samples: int) -> str:
    """The shipped slo-aware preset with flow control on."""
    config: dict[str, Any] = yaml.safe_load((REPO / "docs/configs/slo-aware.yaml").read_text())
    for plugin in config["plugins"]:
        if plugin["type"] == "latency-predictor":
            plugin["parameters"] = {
                "minSamples": predictor_min_samples,
                "retrainInterval": "50ms",
            }
    config["plugins"].append({"type": "workload-aware-ordering-policy"})
    config["featureGates"] = ["flowControl"]
    config["saturationDetector"] = {"queueDepthThreshold": queue_depth_threshold}
    config["flowControl"] = {"dispatchPollInterval": "5ms"}
    return yaml.safe_dump(config)


# First: each request routed counts as a full queue on its endpoint until the next scrape,
# so a burst queues in flow control; the predictor stays cold (it would also be used while
# the saturation filter drops candidates, which the latency scorers do not survive yet).
# Then, reloaded: no saturation, and a predictor that warms after a few requests.
QUEUEING = picker_config(queue_depth_threshold=1, predictor_min_samples=1_000_000)
PREDICTING = picker_config(queue_depth_threshold=64, predictor_min_samples=4)


def exposed(text: str) -> set[str]:
    """Sample names in a Prometheus exposition (`x_bucket`, `x_sum`, `x_total`, ...)."""
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


# Precise prefix routing is not configured in the live run below (it needs KV events and a
# tokenizer); its counters have labels, so they show only once something is counted.
# tests/integration/test_precise_prefix.py runs a picker that counts them.
NOT_IN_THE_LIVE_RUN = frozenset(
    {
        "inference_extension_kv_events_total",
        "inference_extension_kv_event_messages_dropped_total",
        "inference_extension_kv_event_index_resets_total",
        "inference_extension_precise_prefix_approximate_total",
    }
)


def missing_names(picker_names: set[str], server_names: set[str]) -> list[str]:
    """`where: name` for every dashboard query name neither exposition has."""
    missing = []
    for query in promql.dashboard_queries(DASHBOARD):
        for name in sorted(query.names - NOT_IN_THE_LIVE_RUN):
            source = server_names if name.startswith(MODEL_SERVER_PREFIX) else picker_names
            if name not in source:
                missing.append(f"{query.where}: {name}")
    return missing


class PickerProcess:
    def __init__(self, process: asyncio.subprocess.Process, grpc_port: int, metrics_url: str):
        self.process, self.grpc_port, self.metrics_url = process, grpc_port, metrics_url


def print_tail(log_path: Path) -> None:
    print(log_path.read_text(errors="replace")[-4000:])


@contextlib.asynccontextmanager
async def picker_process(
    endpoints: list[str], config_file: Path, log_path: Path
) -> AsyncIterator[PickerProcess]:
    """`sluice picker` on free ports; its log is printed if the test fails inside."""
    grpc_port, health_port, metrics_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluice.cli", "picker",
            "--endpoints", ",".join(endpoints), "--config-file", str(config_file),
            "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--grpc-health-port", str(health_port), "--metrics-port", str(metrics_port),
            "--secure-serving=false", "--refresh-metrics-interval", "20ms",
            "--response-sample-rate", "1",
            stderr=log,
        )  # fmt: skip
    try:
        yield PickerProcess(process, grpc_port, f"http://127.0.0.1:{metrics_port}/metrics")
    except BaseException:
        print_tail(log_path)
        raise
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.text()


async def until_exposed(
    session: aiohttp.ClientSession, url: str, wanted: str, timeout_s: float = 30.0
) -> str:
    """Poll `/metrics` until `wanted` appears in it; scrapes and training run on their own
    schedule, so there is no event to await."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = await scrape(session, url)
        except aiohttp.ClientConnectionError:
            text = ""
        if wanted in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{wanted!r} not in {url} after {timeout_s}s")
        await asyncio.sleep(0.05)


async def complete(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> int:
    all_headers = {"content-type": "application/json", **(headers or {})}
    async with session.post(f"{url}/v1/completions", data=body, headers=all_headers) as r:
        await r.read()
        return r.status


def streamed(prompt: str) -> bytes:
    return orjson.dumps(
        {
            "model": "sim-model",
            "prompt": prompt,
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )


async def queue_a_burst(session: aiohttp.ClientSession, url: str, metrics_url: str) -> None:
    """Bursts of concurrent requests until one of them waited in a flow-control band (its
    queue gauges appear); every request still gets its answer."""
    deadline = time.monotonic() + 30
    while "inference_extension_flow_control_queue_size{" not in await scrape(session, metrics_url):
        assert time.monotonic() < deadline, "no request ever queued in flow control"
        burst = [complete(session, url, streamed(f"burst {i}"), WORKLOAD) for i in range(8)]
        assert await asyncio.gather(*burst) == [200] * 8


WORKLOAD = {"x-workload-context": '{"workload_id": "fraud", "criticality": 4}'}
MISSED_SLO = {**WORKLOAD, "x-slo-ttft-ms": "1"}  # no server answers within 1 ms


@pytest.mark.envoy
async def test_every_dashboard_query_reads_metrics_a_real_picker_exposes(tmp_path: Path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(QUEUEING)
    warm = 'inference_extension_latency_predictor_warm{predictor="latency-predictor"} 1.0'
    with BackgroundFleet([SIM, SIM]) as fleet:
        async with (
            picker_process(fleet.addresses, config_file, tmp_path / "picker.log") as picker,
            aiohttp.ClientSession() as session,
        ):
            metrics_url = picker.metrics_url
            await until_exposed(session, metrics_url, 'inference_pool_ready_pods{name="static"} 2')
            options = envoy_config.GatewayOptions(
                mode=envoy_config.GatewayMode.PICKER, picker_port=picker.grpc_port
            )
            async with EnvoyProcess(options) as envoy:
                url = envoy.url
                for i in range(3):  # cold predictor: scored by the fallback
                    assert await complete(session, url, streamed(f"cold {i}"), MISSED_SLO) == 200
                await queue_a_burst(session, url, metrics_url)
                bad_slo = {"x-slo-ttft-ms": "soon"}
                assert await complete(session, url, streamed("bad slo"), bad_slo) == 200
                bad_context = {"x-workload-context": "not json"}
                assert await complete(session, url, streamed("bad ctx"), bad_context) == 200
                assert await complete(session, url, b"{not json") == 400

                config_file.write_text(PREDICTING)
                await until_exposed(session, metrics_url, 'config_reload_total{result="success"}')
                for i in range(6):
                    assert await complete(session, url, streamed(f"learn {i}"), MISSED_SLO) == 200
                await until_exposed(session, metrics_url, warm)
                for i in range(3):  # warm: predictions are recorded against measurements
                    assert await complete(session, url, streamed(f"warm {i}"), MISSED_SLO) == 200
            picker_names = exposed(await scrape(session, metrics_url))
            server_names = exposed(await scrape(session, f"http://{fleet.addresses[0]}/metrics"))

    referenced = {name for query in promql.dashboard_queries(DASHBOARD) for name in query.names}
    assert len(referenced) >= 40  # the parser found the dashboard's queries
    assert missing_names(picker_names, server_names) == []
    # The check is not vacuous: a panel reading a metric nobody exposes is reported.
    assert missing_names(picker_names - {"workload_request_rate"}, server_names) == [
        "panel 'Request rate by workload': workload_request_rate"
    ]


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for panel in panels for p in (panel, *_panels(panel.get("panels", [])))]


def test_every_picker_metric_family_has_a_panel() -> None:
    """A metric added to the picker shows up here until the dashboard gets a panel for it."""
    from epp import metrics

    referenced = {name for query in promql.dashboard_queries(DASHBOARD) for name in query.names}
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    families = [family.name for family in metrics.REGISTRY.collect()]
    assert len(families) >= 30
    unshown = [f for f in families if not any(f + suffix in referenced for suffix in suffixes)]
    assert unshown == [], f"add panels to {DASHBOARD_PATH.name} for: {unshown}"


def test_panels_have_ids_places_and_the_datasource_variable() -> None:
    panels = _panels(DASHBOARD["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)) and len(panels) >= 40
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        cells = {
            (position["x"] + dx, position["y"] + dy)
            for dx in range(position["w"])
            for dy in range(position["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and panel["description"], panel["title"]
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"datasource", "namespace", "pool", "picker", "model_servers"}
    exprs = [t["expr"] for panel in panels for t in panel.get("targets", [])]
    used = {name for name in variables if any(f"${name}" in expr for expr in exprs)}
    assert used == variables - {"datasource"}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (le, plugin_name) (rate(a_bucket{x=~"$v"}[5m])))',
            {"a_bucket"},
        ),
        (
            "sum(rate(b_total[$__rate_interval])) / sum(rate(c_total[1m] offset 5m))",
            {"b_total", "c_total"},
        ),
        ('time() - max by (p) (d{job="e"})', {"d"}),
        (
            "topk(10, vllm:num_requests_waiting) and on (pod) f > bool 1e3",
            {"vllm:num_requests_waiting", "f"},
        ),
        ('g{label="with sum(x) and {braces}"}', {"g"}),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert promql.metric_names(expr) == names


def test_template_queries_read_the_metric_not_the_label() -> None:
    query = 'label_values(inference_pool_ready_pods{namespace=~"$namespace"}, name)'
    assert promql.template_metric_names(query) == {"inference_pool_ready_pods"}
