"""Starts a real picker (gRPC, metrics scraping, scheduler) on free ports for a test."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from epp.runner import Picker, PickerOptions


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


async def fresh_metrics(picker: Picker, backends_state_changed: bool = True) -> None:
    """Wait until every endpoint has been scraped after now (so new numbers are visible)."""
    start = time.monotonic()
    endpoints = picker.reconciler.current.endpoints

    def scraped() -> bool:
        return all(picker.metrics_store.get(e.key).updated_at > start for e in endpoints)

    await wait_for(scraped, what="a scrape of every endpoint")
