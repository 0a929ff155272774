"""What `sluice demo` shows: the pool as the picker sees it, and what flow control does.

Everything is read the way a user would read it: the picker's `/metrics` page and
workload API on its metrics port, and each simulator's `/sim/state` and `/metrics`. The
only in-process reads are the picker's view of each endpoint (queue, running, KV, in
flight), which is what routing decisions are made from.

`render_screen` draws the terminal view (the URLs stay at the top of every redraw);
`status_line` is the one line printed instead when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from epp.datalayer import prometheus_text
from epp.picker import Picker
from sluice import overload

_QUEUE_SIZE = "inference_extension_flow_control_queue_size"
_QUEUE_DURATION_COUNT = "inference_extension_flow_control_request_queue_duration_seconds_count"
_SATURATION = "inference_extension_flow_control_pool_saturation"
_REQUESTS = "inference_objective_request_total"
_ERRORS = "inference_objective_request_error_total"
_TOO_MANY = "ResourceExhausted"  # answered 429
_UNAVAILABLE = "ServiceUnavailable"  # answered 503


@dataclass(frozen=True, slots=True)
class BandFigures:
    """One priority as the picker counts it (since the picker started)."""

    priority: int
    requests: int
    queued: int  # waiting in flow control now
    admitted: int  # left flow control for an endpoint (the fast path included)
    rejected: int  # answered 429
    expired: int  # answered 503


@dataclass(frozen=True, slots=True)
class PickerFigures:
    requests: int = 0
    rejected: int = 0  # 429
    unavailable: int = 0  # 503
    saturation: float | None = None  # None: flow control has not measured the pool
    bands: tuple[BandFigures, ...] = ()

    @property
    def queued(self) -> int:
        return sum(b.queued for b in self.bands)

    @property
    def admitted(self) -> int:
        return sum(b.admitted for b in self.bands)


def picker_figures(page: prometheus_text.MetricsPage) -> PickerFigures:
    """Request, error and flow-control totals from the picker's `/metrics` page."""

    def by_priority(name: str, **match: str) -> dict[int, int]:
        totals: dict[int, int] = {}
        for sample in page.samples(name):
            if all(sample.labels.get(k) == v for k, v in match.items()):
                priority = int(sample.labels.get("priority", "0"))
                totals[priority] = totals.get(priority, 0) + int(sample.value)
        return totals

    requests = by_priority(_REQUESTS)
    queued = by_priority(_QUEUE_SIZE)
    admitted = by_priority(_QUEUE_DURATION_COUNT, outcome="dispatched")
    rejected = by_priority(_ERRORS, error_code=_TOO_MANY)
    expired = by_priority(_ERRORS, error_code=_UNAVAILABLE)
    priorities = sorted({*requests, *queued, *admitted}, reverse=True)
    bands = tuple(
        BandFigures(
            priority=p,
            requests=requests.get(p, 0),
            queued=queued.get(p, 0),
            admitted=admitted.get(p, 0),
            rejected=rejected.get(p, 0),
            expired=expired.get(p, 0),
        )
        for p in priorities
    )
    saturation = page.samples(_SATURATION)
    return PickerFigures(
        requests=sum(requests.values()),
        rejected=sum(rejected.values()),
        unavailable=sum(expired.values()),
        saturation=saturation[0].value if saturation and admitted else None,
        bands=bands,
    )


@dataclass
class ServerRow:
    """One simulator's own figures."""

    pod: str = "?"
    served: int = 0
    prefix_hits: str = "-"


@dataclass
class Frame:
    """Everything one redraw shows."""

    picker: PickerFigures = field(default_factory=PickerFigures)
    servers: dict[str, ServerRow] = field(default_factory=dict)
    # The picker's workload API answer per scenario workload (empty: none yet).
    workloads: dict[str, Mapping[str, object]] = field(default_factory=dict)


async def collect(
    session: aiohttp.ClientSession,
    metrics_url: str,
    servers: Sequence[str],
    workloads: Sequence[str] = (),
) -> Frame:
    frame = Frame()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with session.get(f"{metrics_url}/metrics") as r:
            frame.picker = picker_figures(prometheus_text.MetricsPage(await r.text()))
    for name in workloads:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(f"{metrics_url}/api/v1/workload/{name}/metrics") as r:
                if r.status == 200:
                    frame.workloads[name] = await r.json()
    for address in servers:
        frame.servers[address] = await _server_row(session, address)
    return frame


async def _server_row(session: aiohttp.ClientSession, address: str) -> ServerRow:
    row = ServerRow()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with session.get(f"http://{address}/sim/state") as r:
            state = await r.json()
            row.pod = str(state.get("pod", "?"))
            row.served = int(state.get("requests_received", 0))
        async with session.get(f"http://{address}/metrics") as r:
            page = prometheus_text.MetricsPage(await r.text())
            hits = sum(s.value for s in page.samples("vllm:prefix_cache_hits_total"))
            queries = sum(s.value for s in page.samples("vllm:prefix_cache_queries_total"))
            if queries:
                row.prefix_hits = f"{hits / queries:.0%}"
    return row


@dataclass(frozen=True, slots=True)
class Header:
    """The lines that stay at the top of every redraw."""

    gateway_url: str
    metrics_url: str
    try_command: str
    flow_control: bool

    def lines(self) -> list[str]:
        lines = [
            "Sluice demo   (Ctrl-C stops everything)",
            f"  Gateway:         {self.gateway_url}",
            f"  Picker metrics:  {self.metrics_url}/metrics",
        ]
        if self.flow_control:
            lines.append(f"  Workload API:    {self.metrics_url}/api/v1/workload/<id>/metrics")
        lines.append(f"  Try: {self.try_command}")
        return lines


def render_screen(
    header: Header,
    picker: Picker,
    frame: Frame,
    scenario: overload.OverloadScenario | None = None,
) -> str:
    lines = [*header.lines(), "", *_endpoint_table(picker, frame.servers), ""]
    figures = frame.picker
    lines.append(
        f"Picker: {figures.requests} requests, {figures.rejected} answered 429, "
        f"{figures.unavailable} answered 503"
    )
    if header.flow_control:
        lines += _band_table(figures, _objective_names(picker))
    else:
        lines.append("Flow control: off (--flow-control or --scenario overload turn it on)")
    if scenario is not None:
        lines += ["", *_scenario_table(scenario, frame)]
    return "\n".join(lines)


def _endpoint_table(picker: Picker, servers: Mapping[str, ServerRow]) -> list[str]:
    now = time.monotonic()
    lines = [
        f"{'pod':<8} {'endpoint':<22} {'queue':>5} {'running':>7} {'KV':>6} "
        f"{'prefix hit':>10} {'in flight':>9} {'served':>7}"
    ]
    in_flight = picker.in_flight.per_endpoint
    for endpoint in picker.reconciler.current.endpoints:
        m = picker.metrics_store.get(endpoint.key)
        row = servers.get(endpoint.target, ServerRow())
        stale = " (stale)" if m.is_stale(now, picker.options.metrics_staleness_threshold_s) else ""
        lines.append(
            f"{row.pod:<8} {endpoint.target:<22} {m.waiting_queue_size:>5} "
            f"{m.running_requests:>7} {m.kv_cache_usage:>6.1%} {row.prefix_hits:>10} "
            f"{in_flight.get(endpoint.key, 0):>9} {row.served:>7}{stale}"
        )
    return lines


def _objective_names(picker: Picker) -> dict[int, str]:
    names: dict[int, str] = {}
    for objective in picker.reconciler.current.objectives.values():
        names.setdefault(objective.priority, objective.name)
    return names


def _band_table(figures: PickerFigures, names: Mapping[int, str]) -> list[str]:
    saturation = "-" if figures.saturation is None else f"{figures.saturation:.2f}"
    lines = [
        f"Flow control: on   pool saturation {saturation}   queued {figures.queued}   "
        f"admitted {figures.admitted}",
        f"{'priority':>8} {'objective':<10} {'requests':>8} {'queued':>6} {'admitted':>8} "
        f"{'429':>6} {'503':>6}",
    ]
    for band in figures.bands:
        lines.append(
            f"{band.priority:>8} {names.get(band.priority, '-'):<10} {band.requests:>8} "
            f"{band.queued:>6} {band.admitted:>8} {band.rejected:>6} {band.expired:>6}"
        )
    return lines


def _scenario_table(scenario: overload.OverloadScenario, frame: Frame) -> list[str]:
    lines = [
        f"Scenario overload: {scenario.offered_rps:.1f} req/s offered, "
        f"{scenario.offered_rps / scenario.capacity_rps:.1f}x the pool's "
        f"~{scenario.capacity_rps:.1f} req/s (what the clients saw)",
        f"{'workload':<10} {'objective':<10} {'crit':>4} {'req/s':>6} {'sent':>6} "
        f"{'200':>6} {'429':>6} {'503':>6} {'other':>5} {'active':>6} {'avg wait':>8}",
    ]
    for workload in overload.WORKLOADS:
        tally = scenario.tallies[workload.name]
        api = frame.workloads.get(workload.name, {})
        wait = api.get("average_wait_s")
        lines.append(
            f"{workload.name:<10} {workload.objective or '-':<10} {workload.criticality:>4} "
            f"{scenario.rate_rps(workload):>6.1f} {tally.sent:>6} {tally.ok:>6} "
            f"{tally.rejected:>6} {tally.unavailable:>6} {tally.failed:>5} "
            f"{api.get('active_requests', '-')!s:>6} "
            f"{'-' if not isinstance(wait, int | float) else f'{wait:.1f}s':>8}"
        )
    return lines


def status_line(frame: Frame, scenario: overload.OverloadScenario | None = None) -> str:
    """One line of `key=value` pairs for a pipe: picker totals, then each workload."""
    figures = frame.picker
    parts = [
        f"requests={figures.requests}",
        f"429={figures.rejected}",
        f"503={figures.unavailable}",
    ]
    if figures.bands and figures.saturation is not None:
        parts += [f"queued={figures.queued}", f"admitted={figures.admitted}"]
        parts += [f"queued[{b.priority}]={b.queued}" for b in figures.bands]
        parts.append(f"saturation={figures.saturation:.2f}")
    for name, tally in scenario.tallies.items() if scenario else ():
        parts.append(
            f"{name}=sent:{tally.sent},200:{tally.ok},429:{tally.rejected},503:{tally.unavailable}"
        )
    return "status " + " ".join(parts)
