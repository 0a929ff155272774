"""Scheduling cost per request, and the prefix scorer's short-prompt hot spot.

Part 1 (default): CPU time of one scheduling cycle plus its pre-request hooks, in-process,
for 10, 100 and 1,000 candidate endpoints and three configs, measured in the same run:

  floor       one profile with only `max-score-picker` (the framework's own cost: the
              baseline the others are reported against)
  default     the default profile: queue x2, kv-cache x2, prefix x3 (+ producer)
  every       every scorer: queue, kv-cache, running-requests, lora-affinity,
              prefix (+ producer), metric-scorer (custom metric), weighted-random-picker

Candidates carry random load metrics; the prefix index is warmed with earlier requests so
matches are found; prompts are ~2,000 characters. Timings include the plugin-duration
metrics the framework records.

Part 2 (`--hotspot`): a discrete-event simulation of 8 model servers (4 concurrent
sequences each, decode time plus prefill per uncached block, metrics refreshed every
50 ms, or every 2 ms to see the effect without staleness) fed mostly short prompts (a
one-block system prompt of Zipf popularity plus a short question) and some long
conversations; half the fleet starts warm, the other half joins empty as the load
doubles. The same arrivals are routed with the default profile twice: upstream's prefix
score (`minBlocksForFullScore: 0`) and the fixed one (`minBlocksForFullScore: 8`).

    /tmp/venv/bin/python -m bench.scheduling_cost
    /tmp/venv/bin/python -m bench.scheduling_cost --hotspot
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epp.config import loader
from epp.datalayer.endpoint_metrics import EndpointMetrics
from epp.datastore.snapshot import Endpoint, EndpointKey
from epp.scheduling.interfaces import Candidate, SchedulingRequest
from epp.scheduling.plugins.prefix_producer import PrefixMatch

RESULTS = Path(__file__).resolve().parent / "results"
HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"

CONFIGS = {
    "floor": HEADER
    + textwrap.dedent("""
        plugins: [{type: max-score-picker}]
        schedulingProfiles: [{name: p, plugins: [{pluginRef: max-score-picker}]}]
    """),
    "default": None,
    "every": HEADER
    + textwrap.dedent("""
        plugins:
        - {type: queue-scorer}
        - {type: kv-cache-utilization-scorer}
        - {type: running-requests-size-scorer}
        - {type: lora-affinity-scorer}
        - {type: prefix-cache-scorer}
        - {type: prometheus-metric, name: load, parameters: {selector: custom_load}}
        - {type: metric-scorer, parameters: {metricName: load, min: 0, max: 100}}
        - {type: weighted-random-picker}
        schedulingProfiles:
        - name: p
          plugins:
          - {pluginRef: queue-scorer, weight: 2}
          - {pluginRef: kv-cache-utilization-scorer, weight: 2}
          - {pluginRef: running-requests-size-scorer}
          - {pluginRef: lora-affinity-scorer}
          - {pluginRef: prefix-cache-scorer, weight: 3}
          - {pluginRef: metric-scorer}
          - {pluginRef: weighted-random-picker}
        dataLayer:
          sources:
          - pluginRef: metrics-data-source
            extractors: [{pluginRef: core-metrics-extractor}, {pluginRef: load}]
    """),
}


def _endpoint(i: int) -> Endpoint:
    return Endpoint(
        EndpointKey(f"ns/p{i}-rank-0"), f"p{i}", "ns", f"10.0.{i // 250}.{i % 250 + 1}", 8000
    )


def _candidates(count: int, rng: random.Random) -> list[Candidate]:
    return [
        Candidate(
            _endpoint(i),
            EndpointMetrics(
                waiting_queue_size=rng.randrange(20),
                running_requests=rng.randrange(64),
                kv_cache_usage=rng.random(),
                running_adapters=frozenset({"sql"}) if i % 3 == 0 else frozenset(),
                max_adapters=4,
                custom={"load": rng.random() * 100},
                updated_at=1.0,
            ),
        )
        for i in range(count)
    ]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cost(endpoint_counts: Sequence[int], requests: int) -> dict[str, Any]:
    rng = random.Random(7)
    prompts = [f"system prompt {k} " * 40 + rng.choice("abcdef") * 300 for k in range(50)]
    out: dict[str, Any] = {}
    for count in endpoint_counts:
        candidates = _candidates(count, rng)
        row: dict[str, Any] = {}
        for name, text in CONFIGS.items():
            config = loader.load_config(text)
            scheduler, lifecycle = config.scheduler, config.lifecycle
            samples: list[float] = []
            for n in range(requests + 200):  # the first 200 warm the index and caches
                request = SchedulingRequest(
                    request_id=str(n),
                    target_model="sql" if n % 4 == 0 else "base",
                    prompt_text=prompts[n % len(prompts)] + str(n),
                )
                started = time.perf_counter()
                result = scheduler.schedule(request, candidates)
                lifecycle.pre_request(request, result)
                elapsed = time.perf_counter() - started
                if n >= 200:
                    samples.append(elapsed * 1e6)
            row[name] = {
                "p50_us": statistics.median(samples),
                "p99_us": _percentile(samples, 0.99),
                "mean_us": statistics.fmean(samples),
            }
        for name in ("default", "every"):
            row[name]["p50_vs_floor"] = row[name]["p50_us"] / row["floor"]["p50_us"]
        out[str(count)] = row
    return out


# ---- the hot-spot simulation -----------------------------------------------------------

SERVERS = 8
SLOTS = 4  # concurrent sequences per server
DECODE_S = 0.4
PREFILL_PER_BLOCK_S = 0.004
BLOCK_CHARS = 64  # the producer's default: 16 tokens x 4 characters


@dataclass
class _Server:
    running: int = 0
    queue: list[float] = field(default_factory=list)  # service times of waiting requests
    served: int = 0


def _workload(
    rng: random.Random, count: int, rate: float, prompts: int, start: float = 0.0
) -> list[tuple[float, str]]:
    """Mostly short chat prompts: one of `prompts` one-block system prompts (Zipf) plus a
    unique question shorter than a block (not hashed); 10% long conversations (~40
    blocks)."""
    systems = [f"S{k:03d} " + rng.choice("abcdefgh") * (BLOCK_CHARS - 5) for k in range(prompts)]
    weights = [1.0 / (k + 1) for k in range(len(systems))]
    conversations = [f"conversation {c} " * 150 for c in range(30)]
    t, out = start, []
    for n in range(count):
        t += rng.expovariate(rate)
        if rng.random() < 0.9:
            question = f"q{n} " + "x" * rng.randrange(BLOCK_CHARS)
            prompt = rng.choices(systems, weights)[0] + question
        else:
            prompt = rng.choice(conversations) + f" turn {n} " * 8
        out.append((t, prompt))
    return out


def _config(min_full_blocks: int, pending: bool = False) -> loader.PickerConfig:
    return loader.load_config(
        HEADER
        + textwrap.dedent(f"""
        plugins:
        - {{type: queue-scorer, parameters: {{countPendingDispatches: {str(pending).lower()}}}}}
        - {{type: kv-cache-utilization-scorer}}
        - {{type: prefix-cache-scorer, parameters: {{minBlocksForFullScore: {min_full_blocks}}}}}
        - {{type: approx-prefix-cache-producer, parameters: {{autoTune: false}}}}
        schedulingProfiles:
        - name: default
          plugins:
          - {{pluginRef: queue-scorer, weight: 2}}
          - {{pluginRef: kv-cache-utilization-scorer, weight: 2}}
          - {{pluginRef: prefix-cache-scorer, weight: 3}}
    """)
    )


class _Fleet:
    """Model servers as a discrete-event simulation, routed by a real scheduler."""

    def __init__(self, config: loader.PickerConfig, scrape_s: float) -> None:
        self.scheduler = config.scheduler
        self.lifecycle = config.lifecycle
        self.scrape_s = scrape_s
        self.servers = [_Server() for _ in range(SERVERS)]
        self.endpoints = [_endpoint(i) for i in range(SERVERS)]
        self.events: list[tuple[float, int, int]] = []  # (time, seq, server) completions
        self.seq = 0
        self.snapshot = [EndpointMetrics(updated_at=0.0)] * SERVERS
        self.now = 0.0
        self.dispatched = [0] * SERVERS  # routed since each server's scrape (the ledger)
        self.next_scrape = 0.0
        self.waiting_since: list[list[float]] = [[] for _ in range(SERVERS)]
        self.reset_stats()

    def reset_stats(self) -> None:
        self.latencies: list[float] = []
        self.matched_blocks = self.total_blocks = 0
        self.max_queue = 0
        self.queued_beside_free_slot = 0
        for server in self.servers:
            server.served = 0

    def _start(self, i: int, now: float, service: float) -> None:
        self.servers[i].running += 1
        self.seq += 1
        heapq.heappush(self.events, (now + service, self.seq, i))

    def _scrape_until(self, until: float) -> None:
        while self.next_scrape <= until:
            for i, s in enumerate(self.servers):
                self.snapshot[i] = EndpointMetrics(
                    waiting_queue_size=len(s.queue),
                    running_requests=s.running,
                    kv_cache_usage=min(1.0, s.running / SLOTS * 0.9),
                    updated_at=self.next_scrape,
                )
                self.dispatched[i] = 0
            self.next_scrape += self.scrape_s

    def advance(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            done_at, _, i = heapq.heappop(self.events)
            self._scrape_until(done_at)
            server = self.servers[i]
            server.running -= 1
            if server.queue:
                service = server.queue.pop(0)
                self.latencies.append(done_at - self.waiting_since[i].pop(0) + service)
                self._start(i, done_at, service)
        if until != float("inf"):
            self._scrape_until(until)

    def route(self, n: int, now: float, prompt: str, active: int) -> None:
        self.advance(now)
        self.now = now
        candidates = [
            Candidate(self.endpoints[i], self.snapshot[i], False, self.dispatched[i])
            for i in range(active)
        ]
        request = SchedulingRequest(str(n), "m", prompt_text=prompt)
        result = self.scheduler.schedule(request, candidates)
        self.lifecycle.pre_request(request, result)
        assert result.primary is not None
        chosen = result.primary.targets[0].endpoint
        i = self.endpoints.index(chosen)
        self.dispatched[i] += 1
        match = request.plugin_data.get("approx-prefix-cache-producer")
        assert isinstance(match, PrefixMatch)
        hit = match.matched_blocks.get(chosen.key, 0)
        self.matched_blocks += hit
        self.total_blocks += match.total_blocks
        service = DECODE_S + PREFILL_PER_BLOCK_S * (match.total_blocks - hit)
        server = self.servers[i]
        server.served += 1
        if server.running < SLOTS:
            self.latencies.append(service)
            self._start(i, now, service)
        else:
            if any(s.running < SLOTS for s in self.servers[:active]):
                self.queued_beside_free_slot += 1  # a hot spot: it waits, a slot idles
            server.queue.append(service)
            self.waiting_since[i].append(now)
            self.max_queue = max(self.max_queue, len(server.queue))


def _simulate(
    min_full_blocks: int,
    warmup: list[tuple[float, str]],
    arrivals: list[tuple[float, str]],
    scrape_s: float,
    pending: bool = False,
) -> dict[str, float]:
    """Half the fleet serves (and caches) the warm-up traffic; then the other half joins
    with empty caches and the load doubles: does traffic reach the new servers?"""
    fleet = _Fleet(_config(min_full_blocks, pending), scrape_s)
    half = SERVERS // 2
    for n, (now, prompt) in enumerate(warmup):
        fleet.route(n, now, prompt, half)
    fleet.reset_stats()
    for n, (now, prompt) in enumerate(arrivals):
        fleet.route(len(warmup) + n, now, prompt, SERVERS)
    fleet.advance(float("inf"))
    served = [s.served for s in fleet.servers]
    return {
        "latency_p50_s": statistics.median(fleet.latencies),
        "latency_p99_s": _percentile(fleet.latencies, 0.99),
        "new_servers_share": sum(served[half:]) / len(arrivals),
        "busiest_share": max(served) / len(arrivals),
        "even_share": 1 / SERVERS,
        "max_queue": fleet.max_queue,
        "queued_beside_free_slot": fleet.queued_beside_free_slot / len(arrivals),
        "prefix_hit_ratio": fleet.matched_blocks / fleet.total_blocks,
    }


def hotspot(requests: int, utilisation: float, prompts: int, scrape_s: float) -> dict[str, Any]:
    capacity = SLOTS / DECODE_S  # requests/s per server
    rng = random.Random(11)
    warmup = _workload(rng, requests // 2, utilisation * capacity * SERVERS / 2, prompts)
    rate = utilisation * capacity * SERVERS
    arrivals = _workload(rng, requests, rate, prompts, start=warmup[-1][0])
    upstream = _simulate(0, warmup, arrivals, scrape_s)
    fixed = _simulate(8, warmup, arrivals, scrape_s)
    pending = _simulate(0, warmup, arrivals, scrape_s, pending=True)
    both = _simulate(8, warmup, arrivals, scrape_s, pending=True)
    return {
        "requests": requests,
        "scrape_interval_s": scrape_s,
        "utilisation": utilisation,
        "system_prompts": prompts,
        "arrival_rate_per_s": rate,
        "upstream_minBlocksForFullScore_0": upstream,
        "fixed_minBlocksForFullScore_8": fixed,
        "upstream_0_and_countPendingDispatches": pending,
        "fixed_8_and_countPendingDispatches": both,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hotspot", action="store_true", help="run the hot-spot simulation")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.hotspot:
        grid = [
            hotspot(args.requests * 10, utilisation, prompts, scrape_s)
            for scrape_s in (0.05, 0.002)
            for prompts in (20, 200)
            for utilisation in (0.6, 0.8)
        ]
        keys = ("queued_beside_free_slot", "max_queue", "latency_p99_s", "prefix_hit_ratio")
        variants = (
            "upstream_minBlocksForFullScore_0",
            "fixed_minBlocksForFullScore_8",
            "upstream_0_and_countPendingDispatches",
            "fixed_8_and_countPendingDispatches",
        )
        print(
            "scrape prompts util | "
            + " | ".join(f"{k} (0 / 8 / 0+pending / 8+pending)" for k in keys)
        )
        for row in grid:
            cells = " | ".join(" / ".join(f"{row[v][k]:.3g}" for v in variants) for k in keys)
            print(
                f"{row['scrape_interval_s'] * 1000:>4g}ms {row['system_prompts']:>7} "
                f"{row['utilisation']:.1f} | {cells}"
            )
        (RESULTS / "prefix_hotspot.json").write_text(json.dumps(grid, indent=2) + "\n")
        return
    result = cost((10, 100, 1000), args.requests)
    for count, row in result.items():
        cells = ", ".join(
            f"{name} p50 {r['p50_us']:.0f} µs p99 {r['p99_us']:.0f} µs"
            + (f" ({r['p50_vs_floor']:.1f}x floor)" if "p50_vs_floor" in r else "")
            for name, r in row.items()
        )
        print(f"{count:>5} endpoints: {cells}")
    (RESULTS / "scheduling_cost.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
