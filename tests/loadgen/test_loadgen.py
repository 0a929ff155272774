"""The load tool: workloads, the open/closed-loop runner against real simulators, summaries."""

from __future__ import annotations

import asyncio
import collections
import io
import itertools
import os

import orjson
import pytest

from sluice.loadgen import cli, plots, progress, runner, summary, workloads
from sluice.sim import config as sim_config
from sluice.sim.fleet import run_fleet


def take(spec: workloads.WorkloadSpec, n: int) -> list[workloads.RequestSpec]:
    return list(itertools.islice(workloads.generate(spec), n))


def test_workloads_are_reproducible():
    spec = workloads.WorkloadSpec(seed=3)
    assert [r.body for r in take(spec, 20)] == [r.body for r in take(spec, 20)]
    assert [r.body for r in take(spec, 5)] != [
        r.body for r in take(workloads.WorkloadSpec(seed=4), 5)
    ]


def test_mix_draws_parts_by_weight_and_keeps_each_parts_stream():
    interactive = workloads.WorkloadSpec(groups=4, slo_ttft_ms=300, seed=1)
    batch = workloads.WorkloadSpec(kind="random", question_tokens=50, slo_ttft_ms=3000, seed=2)
    mixed = list(itertools.islice(workloads.mix([(interactive, 3.0), (batch, 1.0)], seed=5), 2000))
    counts = collections.Counter(r.slo_ttft_ms for r in mixed)
    assert 0.70 < counts[300] / len(mixed) < 0.80
    # A part's requests are its own stream's, in order, whatever they are mixed with.
    assert [r.body for r in mixed if r.slo_ttft_ms == 300] == [
        r.body for r in take(interactive, counts[300])
    ]
    assert [r.body for r in mixed if r.slo_ttft_ms == 3000] == [
        r.body for r in take(batch, counts[3000])
    ]
    with pytest.raises(ValueError, match="weight"):
        next(workloads.mix([(interactive, 0.0)]))


def test_shared_prefix_groups_share_their_system_prompt():
    spec = workloads.WorkloadSpec(groups=3, prefix_tokens=100, question_tokens=5)
    by_group: dict[str, set[str]] = {}
    for request in take(spec, 60):
        prompt = orjson.loads(request.body)["prompt"]
        by_group.setdefault(request.group, set()).add(prompt.split("\n")[0])
    assert len(by_group) == 3
    assert all(len(prefixes) == 1 for prefixes in by_group.values())


def test_ignore_eos_is_sent_only_when_asked():
    asked = take(workloads.WorkloadSpec(ignore_eos=True, max_tokens=4), 3)
    assert all(orjson.loads(r.body)["ignore_eos"] is True for r in asked)
    assert all("ignore_eos" not in orjson.loads(r.body) for r in take(workloads.WorkloadSpec(), 3))


def test_multi_turn_history_grows_and_restarts():
    spec = workloads.WorkloadSpec(kind="multi-turn", groups=1, turns=3, prefix_tokens=10)
    lengths = [len(orjson.loads(r.body)["messages"]) for r in take(spec, 5)]
    assert lengths == [2, 4, 6, 2, 4]
    assert all(r.path == "/v1/chat/completions" for r in take(spec, 2))


def test_headers_for_criticality_slo_and_loras():
    spec = workloads.WorkloadSpec(
        criticality_mix=((1, 0.5), (5, 0.5)), slo_ttft_ms=300, slo_tpot_ms=50, loras=("a", "")
    )
    requests = take(spec, 50)
    contexts = [orjson.loads(r.headers["x-workload-context"]) for r in requests]
    assert {c["criticality"] for c in contexts} == {1, 5}
    assert all(c["workload_id"].startswith("workload-") for c in contexts)
    assert requests[0].headers["x-slo-ttft-ms"] == "300"
    assert [r.criticality for r in requests] == [c["criticality"] for c in contexts]
    assert {orjson.loads(r.body)["model"] for r in requests} == {"a", "sim-model"}


def test_bad_workload_kind():
    with pytest.raises(ValueError, match="unknown workload kind"):
        workloads.WorkloadSpec(kind="burst")


def result(**overrides: object) -> runner.RequestResult:
    values: dict[str, object] = {
        "start_s": 0.0, "status": 200, "pod": "p", "group": "g", "ttft_s": 0.1, "tpot_s": 0.01,
        "latency_s": 1.0, "prompt_tokens": 100, "completion_tokens": 10, "cached_tokens": 50,
        "slo_ttft_ms": None, "slo_tpot_ms": None,
    }  # fmt: skip
    values.update(overrides)
    return runner.RequestResult(**values)  # type: ignore[arg-type]


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert summary.percentile(values, 0.5) == 50
    assert summary.percentile(values, 0.9) == 90
    assert summary.percentile(values, 1.0) == 100


def test_goodput_counts_only_requests_meeting_their_slo():
    results = [
        result(start_s=0.0, slo_ttft_ms=200, ttft_s=0.1),
        result(start_s=0.5, slo_ttft_ms=200, ttft_s=0.3),  # misses TTFT
        result(start_s=0.5, slo_tpot_ms=5, tpot_s=0.01),  # misses TPOT
        result(start_s=1.0, status=503),
    ]
    s = summary.summarise(results)
    assert s.duration_s == pytest.approx(2.0)
    assert s.succeeded == 3
    assert s.goodput_rps == pytest.approx(0.5)
    assert s.prefix_hit_rate == pytest.approx(0.5)
    assert s.per_pod == {"p": 3}
    assert s.slo_attainment == pytest.approx(1 / 3)  # of the three that carried an SLO


def test_slo_fraction_and_skewed_prefix_popularity():
    spec = workloads.WorkloadSpec(groups=10, slo_ttft_ms=100, slo_fraction=0.5, prefix_skew=1.2)
    requests = list(itertools.islice(workloads.generate(spec), 2000))
    with_slo = sum(1 for r in requests if "x-slo-ttft-ms" in r.headers)
    assert 800 < with_slo < 1200
    counts = collections.Counter(r.group for r in requests)
    assert counts["g0"] > 3 * counts["g9"]  # the hottest group draws far more than the coldest
    assert sum(1 for r in requests if r.slo_ttft_ms is not None) == with_slo


FAST = sim_config.SimConfig(time_scale=0.05)


@pytest.mark.parametrize("rate", [None, 200.0])
async def test_runner_against_simulators(rate):
    async with run_fleet(2, config=FAST) as fleet:
        url = fleet.urls[0]
        plan = runner.LoadPlan(url=url, requests=30, rate=rate, concurrency=4)
        spec = workloads.WorkloadSpec(groups=2, prefix_tokens=64, max_tokens=4)
        results = await runner.run_load(plan, workloads.generate(spec))
    assert len(results) == 30
    assert all(r.status == 200 for r in results), results[0].error
    assert all(r.ttft_s is not None and r.completion_tokens == 4 for r in results)
    assert {r.pod for r in results} == {"sim-0"}
    assert summary.summarise(results).prefix_hit_rate > 0  # the second request of a group hits


async def test_runner_records_errors_without_raising():
    plan = runner.LoadPlan(url="http://127.0.0.1:9", requests=3, concurrency=1, timeout_s=2)
    results = await runner.run_load(plan, workloads.generate(workloads.WorkloadSpec()))
    assert [r.status for r in results] == [0, 0, 0]
    assert {r.error for r in results} == {"connection refused to http://127.0.0.1:9/"}


def test_cli_summarises_and_plots(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    runner.write_jsonl([result(pod="a"), result(pod="b", start_s=1.0)], path)
    png = tmp_path / "run.png"
    assert cli.main(["--summarise", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| run | ok/total |" in out and "| run | 2/2 |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefixes_stay_the_same_across_request_seeds():
    def prefixes(seed: int) -> set[str]:
        spec = workloads.WorkloadSpec(groups=2, prefix_tokens=20, seed=seed)
        return {orjson.loads(r.body)["prompt"].split("\n")[0] for r in take(spec, 40)}

    assert prefixes(1) == prefixes(2)


def test_records_keep_criticality_and_older_records_still_load(tmp_path):
    path = tmp_path / "run.jsonl"
    runner.write_jsonl([result(criticality=5, slo_ttft_ms=300.0)], path)
    (record,) = runner.read_jsonl(path)
    assert (record.criticality, record.slo_ttft_ms) == (5, 300.0)
    older = orjson.loads(path.read_bytes())
    del older["criticality"]  # written before records carried it
    path.write_bytes(orjson.dumps(older) + b"\n")
    assert runner.read_jsonl(path)[0].criticality is None


def test_failures_are_grouped_by_reason():
    results = [
        result(),
        result(status=429, error="too many requests\nretry later"),
        result(status=429, error="too many requests"),
        result(status=503, error=""),
        result(status=0, error="connection refused to http://127.0.0.1:9/"),
        result(status=200, error="the response is not valid JSON"),  # a stream cut short
    ]
    assert summary.failures(results) == (
        "5 of 6 requests failed: HTTP 429: too many requests (2), HTTP 503 (1), "
        "connection refused to http://127.0.0.1:9/ (1), the response is not valid JSON (1)"
    )
    assert summary.summarise(results).succeeded == 1
    assert summary.failures([result()]) is None


def test_breakdowns_only_when_a_run_mixes_them():
    same = [result(criticality=3, slo_ttft_ms=200), result(criticality=3, slo_ttft_ms=200)]
    assert summary.breakdown(same, summary.criticality_of) == []
    assert summary.breakdown(same, summary.slo_of) == []
    mixed = [
        result(criticality=1, ttft_s=0.1, slo_ttft_ms=200),
        result(criticality=1, ttft_s=0.2, slo_ttft_ms=200),
        result(criticality=1, ttft_s=0.3, slo_ttft_ms=200),  # misses its SLO
        result(criticality=5, ttft_s=0.2),
        result(criticality=None, status=503, error="full"),
    ]
    by_level = summary.breakdown(mixed, summary.criticality_of)
    assert [(g.label, g.requests, g.succeeded) for g in by_level] == [
        ("1", 3, 3), ("5", 1, 1), ("none sent", 1, 0),
    ]  # fmt: skip
    assert by_level[0].ttft_p50_s == pytest.approx(0.2)
    assert by_level[0].ttft_p90_s == pytest.approx(0.3)
    assert by_level[0].slo_attainment == pytest.approx(2 / 3)
    assert by_level[1].slo_attainment is None
    by_slo = summary.breakdown(mixed, summary.slo_of)
    assert [(g.label, g.requests) for g in by_slo] == [("TTFT 200 ms", 3), ("no SLO", 2)]
    table = summary.breakdown_table("criticality", [("run", g) for g in by_level])
    assert table.splitlines()[-1] == "| run | none sent | 0/1 | - | - | - |"


def test_per_pod_counts_include_listed_pods_that_served_nothing():
    runs = [("a", [result(pod="sim-1"), result(pod="sim-1"), result(pod="sim-2", status=503)])]
    names, counts = plots.served_per_pod(runs, ("sim-0", "sim-1"))
    assert names == ["sim-0", "sim-1", "sim-2"]  # listed first, then any other that answered
    assert counts == [[0, 2, 0]]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_in_a_log_counts_and_rates():
    clock, stream = Clock(), io.StringIO()
    line = progress.Progress(10, stream, clock=clock)
    assert line.interval_s == progress.LOG_INTERVAL_S
    for _ in range(4):
        line.request_sent()
    clock.now += 1.0
    line.request_finished(True)
    line.request_finished(False)
    clock.now += 1.0
    line.show()
    assert stream.getvalue() == "sent 4/10, completed 1, failed 1, 2.0s, 1.0 req/s\n"
    clock.now += 10.0  # nothing finished in the last 5 s: the current rate is 0
    line.close()
    last = stream.getvalue().splitlines()[-1]
    assert last == "sent 4/10, completed 1, failed 1, 12.0s, 0.0 req/s"


def test_progress_line_on_a_terminal_is_redrawn_in_place():
    primary, secondary = os.openpty()
    with open(secondary, "w") as terminal, open(primary, "rb", buffering=0) as screen:
        line = progress.Progress(2, terminal, clock=Clock())
        assert line.interval_s == progress.TTY_INTERVAL_S
        line.request_sent()
        line.show()
        line.request_finished(True)
        line.close()
        written = screen.read(4096)
    assert written.count(b"\r") >= 2 and b"\x1b[K" in written
    assert written.rstrip().endswith(b"sent 1/2, completed 1, failed 0, 0.0s, 0.0 req/s\x1b[K")


async def test_progress_line_repeats_while_the_run_goes_on():
    stream = io.StringIO()
    line = progress.Progress(5, stream, interval_s=0.01)
    showing = asyncio.create_task(line.run())
    deadline = asyncio.get_running_loop().time() + 10
    while stream.getvalue().count("\n") < 2:
        assert asyncio.get_running_loop().time() < deadline, stream.getvalue()
        await asyncio.sleep(0.01)
    showing.cancel()
    assert stream.getvalue().startswith("sent 0/5, completed 0, failed 0, ")
