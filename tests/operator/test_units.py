"""The operator's pieces on their own: feed coalescing, WorkloadClass status, settings."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading

import pytest
from epp_operator import resources, settings, status
from epp_operator.feed import ClusterFeed

from epp.datastore.reconciler import Reconciler
from tests.operator.harness import NAMESPACE, pod, pool


async def _drain(loop: asyncio.AbstractEventLoop) -> None:
    # Callbacks scheduled with call_soon_threadsafe run before this future resolves.
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


async def test_feed_coalesces_a_burst_into_one_snapshot() -> None:
    loop = asyncio.get_running_loop()
    reconciler = Reconciler(pool_name="llm", pool_namespace=NAMESPACE)
    snapshots = []
    reconciler.subscribe(snapshots.append)
    delayed: list[tuple[float, object]] = []  # rebuilds scheduled for later: (delay, call)
    feed = ClusterFeed(
        loop, reconciler, min_interval_s=0.2, call_later=lambda s, f: delayed.append((s, f))
    )

    def burst() -> None:  # kopf's thread
        feed.upsert(resources.to_object(resources.POOL, pool(8000)))
        for i in range(200):
            feed.upsert(resources.to_object(resources.POD, pod(f"p{i}", f"10.0.{i // 250}.{i}")))

    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()
    await _drain(loop)
    assert len(snapshots) == 1 and feed.flushes == 1
    assert len(reconciler.current.endpoints) == 200

    # A change right after a rebuild waits out the minimum interval, then applies.
    feed.remove("Pod", NAMESPACE, "p0")
    feed.remove("Pod", NAMESPACE, "never-existed")  # nothing to do
    await _drain(loop)
    assert len(snapshots) == 1
    [(delay_s, rebuild)] = delayed
    assert 0 < delay_s <= 0.2  # what is left of the interval since the first rebuild
    rebuild()  # type: ignore[operator]  # the interval is over
    assert len(snapshots) == 2
    assert len(reconciler.current.endpoints) == 199
    assert feed.flushes == 2


async def test_feed_without_coalescing_applies_each_event() -> None:
    loop = asyncio.get_running_loop()
    reconciler = Reconciler(pool_name="llm", pool_namespace=NAMESPACE)
    snapshots = []
    reconciler.subscribe(snapshots.append)
    feed = ClusterFeed(loop, reconciler, coalesce=False)
    feed.upsert(resources.to_object(resources.POOL, pool(8000)))
    for i in range(5):
        feed.upsert(resources.to_object(resources.POD, pod(f"p{i}", f"10.0.0.{i + 1}")))
    await _drain(loop)
    assert len(snapshots) == 6
    assert len(reconciler.current.endpoints) == 5


async def test_feed_marks_synced_after_pending_objects() -> None:
    loop = asyncio.get_running_loop()
    reconciler = Reconciler(pool_name="llm", pool_namespace=NAMESPACE)
    feed = ClusterFeed(loop, reconciler, min_interval_s=0)
    feed.upsert(resources.to_object(resources.POOL, pool(8000)))
    feed.upsert(resources.to_object(resources.POD, pod("a", "10.0.0.1")))
    feed.mark_synced()
    await _drain(loop)
    first_synced = reconciler.current
    assert first_synced.synced and len(first_synced.endpoints) == 1


def test_pods_are_slimmed_to_what_the_picker_reads() -> None:
    obj = resources.to_object(resources.POD, {**pod("a", "10.0.0.1"), "kind": None})
    assert obj["kind"] == "Pod" and obj["apiVersion"] == "v1"
    assert "spec" not in obj
    assert obj["status"] == {
        "podIP": "10.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    assert obj["metadata"]["labels"] == {"app": "vllm"}


NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def _wc(spec: dict, generation: int = 1, status_: dict | None = None) -> dict:
    obj = {
        "kind": "WorkloadClass",
        "metadata": {"name": "w", "namespace": NAMESPACE, "generation": generation},
        "spec": spec,
    }
    if status_ is not None:
        obj["status"] = status_
    return obj


def test_workload_class_status_accepted_and_rejected() -> None:
    wanted = status.workload_class_status(_wc({"criticality": 2}), "llm", now=NOW)
    assert wanted is not None
    assert wanted["observedGeneration"] == 1
    (condition,) = wanted["conditions"]
    assert condition["status"] == "True" and condition["reason"] == "Accepted"
    assert condition["lastTransitionTime"] == "2026-01-02T03:04:05Z"

    bad = status.workload_class_status(_wc({"limits": {"burst": 0}}, 2), "llm", now=NOW)
    assert bad is not None
    (condition,) = bad["conditions"]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert "spec.limits.burst" in condition["message"]
    assert bad["observedGeneration"] == 2


def test_workload_class_status_is_stable_and_skips_other_pools() -> None:
    first = status.workload_class_status(_wc({}), "llm", now=NOW)
    assert first is not None
    later = NOW + datetime.timedelta(hours=1)
    again = status.workload_class_status(_wc({}, status_=first), "llm", now=later)
    assert again == first  # same verdict: same transition time, nothing to patch
    assert not status.needs_update(_wc({}, status_=first), first)
    assert status.needs_update(
        _wc({}, generation=2, status_=first),
        status.workload_class_status(_wc({}, 2, first), "llm") or {},
    )
    other = _wc({"poolRef": {"name": "another"}})
    assert status.workload_class_status(other, "llm") is None


def _parse(*argv: str) -> settings.OperatorOptions:
    parser = settings.build_argument_parser()
    return settings.options_from_args(parser, parser.parse_args(list(argv)))


def test_settings_from_flags() -> None:
    options = _parse(
        "--pool-name",
        "llm",
        "--pool-namespace",
        "ai",
        "--config-configmap",
        "cfg",
        "--clusterwide",
        "--standalone=false",
        "--event-level",
        "warning",
        "--watch-server-timeout",
        "60s",
        "--reconnect-backoff",
        "250ms",
        "--liveness-port",
        "0",
        "--shutdown-grace-period",
        "20s",
        "--namespace",
        "extra",
    )
    assert (options.pool_name, options.pool_namespace) == ("llm", "ai")
    assert options.config_configmap == "cfg" and options.clusterwide
    assert not options.standalone and options.event_level == logging.WARNING
    assert options.watch_server_timeout_s == 60.0 and options.reconnect_backoff_s == 0.25
    assert options.liveness_port == 0 and options.shutdown_grace_s == 20.0
    assert options.picker.shutdown_grace_s == 20.0
    assert options.watched_namespaces == ("extra",)
    assert _parse("--pool-name", "p").watched_namespaces == ("default",)
    assert _parse("--pool-name", "p").standalone


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "--pool-name is required"),
        (("--pool-name", "p", "--endpoints", "1.2.3.4:80"), "are for `sluice picker`"),
        (("--pool-name", "p", "--event-level", "loud"), "expected one of info, warning"),
        (("--pool-name", "p", "--liveness-port", "70000"), "port must be between 0 and 65535"),
        (("--pool-name", "p", "--reconnect-backoff", "soon"), "--reconnect-backoff"),
    ],
)
def test_bad_flags_exit_with_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


async def test_feed_retain_drops_only_what_a_fresh_list_lacks() -> None:
    loop = asyncio.get_running_loop()
    reconciler = Reconciler(pool_name="llm", pool_namespace=NAMESPACE)
    feed = ClusterFeed(loop, reconciler, min_interval_s=0)
    feed.upsert(resources.to_object(resources.POOL, pool(8000)))
    for name, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2")):
        feed.upsert(resources.to_object(resources.POD, pod(name, ip)))
    since = feed.stamp()
    feed.upsert(resources.to_object(resources.POD, pod("c", "10.0.0.3")))  # after the list
    dropped = feed.retain("Pod", {(NAMESPACE, "a")}, since)
    await _drain(loop)
    assert dropped == 1  # b; c is newer than the list
    assert {e.pod_name for e in reconciler.current.endpoints} == {"a", "c"}
