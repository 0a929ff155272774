"""The mixed workload under overload: who waits how long, per criticality.

A discrete-time model drives the real `FlowController` (real policies, registry,
saturation detector) with a fake clock, so minutes of overload take seconds and every run
is reproducible. The pool: `--endpoints` servers running up to `--max-running` requests
each, service times exponential with mean `--service-s`, FIFO waiting at the server; the
detector sees each endpoint's waiting queue, refreshed every `--scrape-ms` as a scrape
would. Arrivals are Poisson at `--overload` x capacity for `--duration-s`, then stop
while the backlog drains. Mix: 30% criticality 1 (10 batch workloads), 50% criticality 3
(10 chat workloads), 20% criticality 5 (5 fraud workloads).

The same arrivals run under `fcfs-ordering-policy` as the baseline: the question is what
workload-aware ordering changes relative to first come, first served.

    /tmp/venv/bin/python -m bench.flowcontrol_overload
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import random
import time
from collections import deque
from pathlib import Path

from epp.config import flow_control as flow_section
from epp.datalayer.endpoint_metrics import EndpointLoad, EndpointMetrics
from epp.flowcontrol.controller import FlowController, FlowRequest
from epp.flowcontrol.outcomes import Rejection
from epp.flowcontrol.workload import WorkloadContext, WorkloadId

HERE = Path(__file__).resolve().parent
CLASSES = ((1, 0.3, "batch", 10), (3, 0.5, "chat", 10), (5, 0.2, "fraud", 5))


class Pool:
    def __init__(self, endpoints: int, max_running: int) -> None:
        self.endpoints = endpoints
        self.capacity = endpoints * max_running
        self.running = 0
        self.waiting: deque[float] = deque()  # service times of requests waiting at servers
        self.finishing: list[float] = []
        self.snapshot: list[EndpointLoad] = []
        self.scrape()

    def scrape(self) -> None:
        per_endpoint = len(self.waiting) // self.endpoints
        m = EndpointMetrics(waiting_queue_size=per_endpoint, updated_at=time.monotonic())
        self.snapshot = [EndpointLoad(m)] * self.endpoints

    def __call__(self) -> list[EndpointLoad]:
        return self.snapshot

    def start(self, now: float, service_s: float) -> None:
        if self.running < self.capacity:
            self.running += 1
            heapq.heappush(self.finishing, now + service_s)
        else:
            self.waiting.append(service_s)

    def advance(self, now: float) -> None:
        while self.finishing and self.finishing[0] <= now:
            heapq.heappop(self.finishing)
            self.running -= 1
            if self.waiting:
                self.running += 1
                heapq.heappush(self.finishing, now + self.waiting.popleft())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _longest_gap(times: list[float], end: float) -> float:
    points = [0.0, *sorted(times), end]
    return max(b - a for a, b in itertools.pairwise(points))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_policy(policy: str, args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    pool = Pool(args.endpoints, args.max_running)
    clock = Clock()
    config = {"defaultPriorityBand": {"orderingPolicyRef": policy}}
    detector = flow_section.detector({"metricsStalenessThreshold": "1h"}, {})
    settings = flow_section.settings(config, detector, {})
    flow = FlowController(settings, pool=pool, clock=clock)
    capacity_rps = pool.capacity / args.service_s
    rate = args.overload * capacity_rps
    waits: dict[int, list[float]] = {c: [] for c, *_ in CLASSES}
    arrived: dict[int, int] = {c: 0 for c, *_ in CLASSES}
    served_during_overload: dict[int, int] = {c: 0 for c, *_ in CLASSES}
    dispatched_at: dict[int, list[float]] = {c: [] for c, *_ in CLASSES}
    tasks: list[asyncio.Task[None]] = []

    async def request(n: int, criticality: int, workload: str, service_s: float) -> None:
        arrived_at = clock.now
        admission = await flow.admit(
            FlowRequest(
                request_id=str(n),
                workload=WorkloadContext(WorkloadId(workload), criticality),
                fairness_id=workload,
                priority=0,
            )
        )
        waits[criticality].append(clock.now - arrived_at)
        dispatched_at[criticality].append(clock.now)
        if clock.now <= args.duration_s:
            served_during_overload[criticality] += 1
        pool.start(clock.now, service_s)
        assert not isinstance(admission, Rejection)  # no limits are configured here
        admission.release()  # its slot in the registry; the pool model holds the work

    dt = args.tick_ms / 1000
    scrape_every = max(1, round(args.scrape_ms / args.tick_ms))
    next_arrival = rng.expovariate(rate)
    n, tick = 0, 0
    wall = time.perf_counter()
    while clock.now < args.duration_s or flow.queued() or any(not t.done() for t in tasks):
        clock.now = tick * dt
        tick += 1
        while clock.now <= args.duration_s and next_arrival <= clock.now:
            n += 1
            pick = rng.random()
            for criticality, share, prefix, workloads in CLASSES:  # noqa: B007 (used after)
                if pick < share:
                    break
                pick -= share
            workload = f"{prefix}-{rng.randrange(workloads)}"
            arrived[criticality] += 1
            tasks.append(
                asyncio.create_task(
                    request(n, criticality, workload, rng.expovariate(1 / args.service_s))
                )
            )
            next_arrival += rng.expovariate(rate)
        await asyncio.sleep(0)
        pool.advance(clock.now)
        if tick % scrape_every == 0:
            pool.scrape()
        flow.dispatch_ready()
        await asyncio.sleep(0)
        if clock.now > args.duration_s * 20:
            raise RuntimeError("backlog never drained")
    await asyncio.gather(*tasks)
    per_class = {}
    for criticality, _, prefix, _ in CLASSES:
        w = waits[criticality]
        per_class[criticality] = {
            "workloads": prefix,
            "arrived": arrived[criticality],
            "served": len(w),
            "served_during_overload_share": served_during_overload[criticality]
            / max(1, arrived[criticality]),
            "p50_wait_s": percentile(w, 0.5),
            "p95_wait_s": percentile(w, 0.95),
            "max_wait_s": max(w, default=0.0),
            # Starvation shows as a long stretch of overload with no dispatch of the class.
            "longest_gap_in_overload_s": _longest_gap(
                [t for t in dispatched_at[criticality] if t <= args.duration_s],
                args.duration_s,
            ),
        }
    return {
        "policy": policy,
        "capacity_rps": capacity_rps,
        "arrival_rps": rate,
        "requests": n,
        "drained_at_s": clock.now,
        "wall_s": time.perf_counter() - wall,
        "classes": per_class,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpoints", type=int, default=2)
    parser.add_argument("--max-running", type=int, default=8)
    parser.add_argument("--service-s", type=float, default=2.0)
    parser.add_argument("--overload", type=float, default=1.25)
    parser.add_argument("--duration-s", type=float, default=300.0)
    parser.add_argument("--tick-ms", type=float, default=10.0)
    parser.add_argument("--scrape-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "flowcontrol_overload.json")
    args = parser.parse_args()
    results = [
        asyncio.run(run_policy(policy, args))
        for policy in ("workload-aware-ordering-policy", "fcfs-ordering-policy")
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    first = results[0]
    print(
        f"capacity {first['capacity_rps']:.1f} req/s, arrivals {first['arrival_rps']:.1f} "
        f"req/s for {args.duration_s:.0f} s, {first['requests']} requests"
    )
    print(
        "| policy | criticality | arrived | served in overload | p50 wait s | p95 wait s | "
        "max wait s | longest gap s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        for criticality, c in result["classes"].items():  # type: ignore[attr-defined]
            print(
                f"| {result['policy']} | {criticality} | {c['arrived']} | "
                f"{c['served_during_overload_share'] * 100:.0f}% | {c['p50_wait_s']:.1f} | "
                f"{c['p95_wait_s']:.1f} | {c['max_wait_s']:.1f} | "
                f"{c['longest_gap_in_overload_s']:.1f} |"
            )


if __name__ == "__main__":
    main()
