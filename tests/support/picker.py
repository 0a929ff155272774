"""Starts a real picker (gRPC, metrics scraping, scheduler) on free ports for a test."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from epp.picker import Picker, PickerOptions


async def wait_for(
    condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll a condition the test cannot await as an event (e.g. a scrape landing)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def scrape_count_at_least(picker: Picker, count: int) -> Callable[[], bool]:
    def check() -> bool:
        endpoints = picker.reconciler.current.endpoints
        now = time.monotonic()
        fresh = [e for e in endpoints if not picker.metrics_store.get(e.key).is_stale(now, 1.0)]
        return len(fresh) >= count

    return check


@contextlib.asynccontextmanager
async def running_picker(**overrides: object) -> AsyncIterator[Picker]:
    options = PickerOptions(
        host="127.0.0.1",
        grpc_port=0,
        health_port=0,
        metrics_port=0,
        secure_serving=False,
        refresh_metrics_interval_s=0.02,
        manifest_poll_interval_s=0.05,
        shutdown_grace_s=0.5,
        response_sample_rate=1.0,  # every response read: tests check what it yields
    )
    options = PickerOptions(
        **{**{f: getattr(options, f) for f in options.__dataclass_fields__}, **overrides}
    )  # type: ignore[arg-type]
    picker = Picker(options)
    await picker.start()
    try:
        yield picker
    finally:
        await picker.stop()


async def fresh_metrics(picker: Picker) -> None:
    """Wait until every endpoint has been scraped by a scrape that *began* after now.

    A scrape already in flight may land after this call with the old numbers; each
    endpoint's loop scrapes one at a time, so the second completed scrape from now on
    started after now and carries whatever the test just set.
    """
    endpoints = picker.reconciler.current.endpoints

    def ticks(key: object) -> int:
        status = picker.collector.status(key)  # type: ignore[arg-type]
        return status.ticks if status is not None else 0

    start = {e.key: ticks(e.key) for e in endpoints}

    def scraped() -> bool:
        return all(
            ticks(e.key) >= start[e.key] + 2 and picker.metrics_store.get(e.key).updated_at > 0
            for e in endpoints
        )

    await wait_for(scraped, what="a fresh scrape of every endpoint")


def precise_picker_config(source: str, model: str, tokenizer_dir: object) -> str:
    """A picker config routing on the precise prefix index (weight 10) and the queue (1).
    `source`: the kv-events-data-source's parameters as a YAML flow mapping, e.g.
    `{mode: connect, port: 5557}`; `tokenizer_dir`: `model`'s tokenizer directory."""
    return f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {{type: kv-events-data-source, parameters: {source}}}
- {{type: kv-events-extractor}}
- type: precise-prefix-cache-producer
  parameters: {{tokenizers: {{{model}: '{tokenizer_dir}'}}}}
- {{type: precise-prefix-cache-scorer}}
- {{type: queue-scorer}}
data:
  sources:
  - {{pluginRef: metrics-data-source, extractors: [{{pluginRef: core-metrics-extractor}}]}}
  - {{pluginRef: kv-events-data-source, extractors: [{{pluginRef: kv-events-extractor}}]}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: precise-prefix-cache-scorer, weight: 10}}
  - {{pluginRef: queue-scorer, weight: 1}}
"""
