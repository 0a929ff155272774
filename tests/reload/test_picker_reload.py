"""Config changes on a running picker: `reload_config`, the watched `--config-file`, a
data layer from config, and `metric-scorer` routing by a backend's custom gauge."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from epp import metrics
from epp.config.loader import ConfigError
from epp.picker import Picker
from tests.extproc.test_protocol import route
from tests.support.backends import Backend, backends
from tests.support.extproc_client import ExtProcClient, set_headers
from tests.support.picker import fresh_metrics, running_picker, wait_for

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"

# Route by a gauge the backends export, lowest wins; nothing else scores.
BY_GAUGE = HEADER + textwrap.dedent("""
    plugins:
    - {type: prometheus-metric, name: gpu-temp,
       parameters: {selector: 'gpu_temperature_celsius{gpu="0"}', aggregation: max}}
    - {type: metric-scorer, parameters: {metricName: gpu-temp, min: 30, max: 90}}
    schedulingProfiles:
    - {name: cool, plugins: [{pluginRef: metric-scorer}]}
    dataLayer:
      sources:
      - pluginRef: metrics-data-source
        extractors: [{pluginRef: core-metrics-extractor}, {pluginRef: gpu-temp}]
""")


def _reloads(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("config_reload_total", {"result": result}) or 0.0


def _temperatures(servers: list[Backend], *celsius: int) -> None:
    for server, value in zip(servers, celsius, strict=True):
        server.state.custom_lines = [
            "# TYPE gpu_temperature_celsius gauge",
            f'gpu_temperature_celsius{{gpu="0"}} {value}',
            f'gpu_temperature_celsius{{gpu="1"}} {value - 50}',  # another GPU: not selected
        ]


async def _gauges_seen(picker: Picker, servers: list[Backend], *celsius: int) -> None:
    """Wait until the picker holds these GPU temperatures (a scrape that was in flight
    when the page or the config changed may still land with the old numbers)."""
    by_target = {s.target: float(c) for s, c in zip(servers, celsius, strict=True)}

    def seen() -> bool:
        return all(
            picker.metrics_store.get(e.key).custom.get("gpu-temp") == by_target[e.target]
            for e in picker.reconciler.current.endpoints
        )

    await wait_for(seen, what=f"gpu-temp {by_target}")


async def _destination(client: ExtProcClient) -> str:
    responses = await route(client)
    return set_headers(responses[0])["x-gateway-destination-endpoint"]


async def test_metric_scorer_routes_by_a_custom_gauge_the_backends_export() -> None:
    async with backends(ADDRESSES) as servers:
        _temperatures(servers, 80, 45, 60)
        endpoints = ",".join(s.target for s in servers)
        async with running_picker(endpoints=endpoints, config_text=BY_GAUGE) as picker:
            client = ExtProcClient(picker.grpc_port)
            await _gauges_seen(picker, servers, 80, 45, 60)
            for _ in range(5):
                assert await _destination(client) == servers[1].target
            _temperatures(servers, 40, 85, 60)  # the gauge moves; so does the traffic
            await _gauges_seen(picker, servers, 40, 85, 60)
            for _ in range(5):
                assert await _destination(client) == servers[0].target
            key = picker.reconciler.current.endpoints[0].key
            assert picker.metrics_store.get(key).custom == {"gpu-temp": 40.0}
            await client.close()


async def test_reload_swaps_valid_configs_and_keeps_the_old_one_on_error() -> None:
    async with backends(ADDRESSES) as servers:
        _temperatures(servers, 80, 45, 60)
        servers[2].state.waiting = 0
        servers[0].state.waiting = servers[1].state.waiting = 9
        endpoints = ",".join(s.target for s in servers)
        async with running_picker(endpoints=endpoints) as picker:
            client = ExtProcClient(picker.grpc_port)
            await fresh_metrics(picker)
            assert await _destination(client) == servers[2].target  # default: shortest queue
            producer = picker.config.plugins["approx-prefix-cache-producer"]
            default_source = picker.collector.sources[0]
            ok, failed = _reloads("success"), _reloads("failure")

            picker.reload_config(BY_GAUGE, "test")
            assert _reloads("success") == ok + 1
            assert picker.collector.sources == picker.config.data_sources
            assert picker.collector.sources[0] is not default_source
            await _gauges_seen(picker, servers, 80, 45, 60)
            assert await _destination(client) == servers[1].target  # coolest GPU

            before = picker.config
            with pytest.raises(ConfigError, match="no plugin named 'metric-scorrer'"):
                picker.reload_config(BY_GAUGE.replace("metric-scorer}", "metric-scorrer}"), "t")
            assert picker.config is before and _reloads("failure") == failed + 1
            assert await _destination(client) == servers[1].target

            picker.reload_config(None, "test")  # back to the default config
            assert picker.config.plugins["approx-prefix-cache-producer"] is not producer
            await fresh_metrics(picker)
            assert await _destination(client) == servers[2].target
            await client.close()


async def test_metrics_survive_a_data_layer_change() -> None:
    async with backends(ADDRESSES[:1]) as servers:
        servers[0].state.waiting = 4
        _temperatures(servers, 50)
        async with running_picker(endpoints=servers[0].target) as picker:
            await fresh_metrics(picker)
            key = picker.reconciler.current.endpoints[0].key
            before = picker.metrics_store.get(key)
            assert before.waiting_queue_size == 4
            picker.reload_config(BY_GAUGE, "test")
            # Same entry until the next tick lands: the store was not cleared by the swap.
            assert picker.metrics_store.get(key).waiting_queue_size == 4
            await _gauges_seen(picker, servers, 50)
            after = picker.metrics_store.get(key)
            assert (after.waiting_queue_size, after.custom) == (4, {"gpu-temp": 50.0})


async def test_config_file_is_watched(tmp_path: Path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(HEADER + "plugins: [{type: queue-scorer}]\n")
    async with backends(ADDRESSES[:1]) as servers:
        _temperatures(servers, 50)
        async with running_picker(
            endpoints=servers[0].target, config_file=path, config_poll_interval_s=0.02
        ) as picker:
            first = picker.config
            (only,) = first.scheduler.profiles["default"].scorers
            assert only.scorer.name == "queue-scorer"
            failed = _reloads("failure")
            path.write_text(HEADER + "plugins: [{type: queue-scorrer}]\n")
            await wait_for(lambda: _reloads("failure") > failed, what="a rejected reload")
            assert picker.config is first

            path.write_text(BY_GAUGE)
            await wait_for(lambda: picker.config is not first, what="the new config")
            assert "cool" in picker.config.scheduler.profiles
            await _gauges_seen(picker, servers, 50)


def test_validate_config_flag(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(BY_GAUGE)
    bad.write_text(BY_GAUGE.replace("metricName: gpu-temp", "metricName: gpu-tmp"))

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sluice.cli", "picker", "--validate-config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = run(good)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert lines[0] == f"# effective config of {good}"
    assert lines[-1].startswith("# valid: 2 plugins declared, 5 added by default (")
    assert lines[-1].endswith("; profiles: cool")
    failed = run(bad)
    assert failed.returncode == 1 and failed.stdout == ""
    (line,) = failed.stderr.strip().splitlines()
    assert "reads custom metric 'gpu-tmp', but no extractor in dataLayer produces it" in line
    missing = run(tmp_path / "nope.yaml")
    assert missing.returncode == 1 and "cannot read" in missing.stderr
