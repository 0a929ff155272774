"""`kv-events-data-source` over real ZMQ sockets: connecting to each pod's publisher,
binding one collector socket, dropping what it cannot use."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest
import zmq

from epp import metrics
from epp.config import loader
from epp.config.document import ConfigError
from epp.datalayer import kv_event_source, kv_events
from epp.datastore.snapshot import Endpoint, EndpointKey


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch(sequence: int, topic: str = "kv@127.0.0.1:8000@m") -> list[bytes]:
    stored = kv_events.BlockStored((sequence,), None, (1, 2, 3, 4), 4)
    return kv_events.encode(kv_events.EventBatch(topic, sequence, 0.0, (stored,)))


async def received(
    source: kv_event_source.KvEventsDataSource,
    endpoint: Endpoint,
    publish: Callable[[int], None],
    wanted: int = 1,
) -> list[kv_events.EventBatch]:
    """Publish until the subscription is live (ZMQ drops what precedes it), then collect."""
    got: list[kv_events.EventBatch] = []
    deadline = time.monotonic() + 10
    sequence = 0
    while len(got) < wanted:
        assert time.monotonic() < deadline, "no KV events arrived"
        publish(sequence)
        sequence += 1
        await asyncio.sleep(0.01)
        got.extend((await source.fetch(endpoint)).batches)
    return got


def endpoint(port: int = 8000, annotations: dict[str, str] | None = None) -> Endpoint:
    return Endpoint(
        EndpointKey("ns/pod-rank-0"),
        "pod",
        "ns",
        "127.0.0.1",
        port,
        annotations=annotations or {},
    )


@pytest.fixture
def context() -> zmq.Context[zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


async def test_connect_mode_subscribes_at_the_annotated_port(context: zmq.Context) -> None:
    port = free_port()
    publisher = context.socket(zmq.PUB)
    publisher.bind(f"tcp://127.0.0.1:{port}")
    source = kv_event_source.new_kv_events_data_source("kv", {"port": 1})
    target = endpoint(annotations={"sluice.io/kv-events-port": str(port)})
    assert source.publisher_address(target) == f"tcp://127.0.0.1:{port}"
    try:
        got = await received(source, target, lambda seq: publisher.send_multipart(batch(seq)))
        assert got[0].events[0].block_hashes == (got[0].sequence,)  # type: ignore[union-attr]
        source.forget(target)  # the socket goes; a later fetch connects again
        await received(source, target, lambda seq: publisher.send_multipart(batch(seq)))
    finally:
        source.close()


def test_connect_mode_adds_the_rank_and_rejects_a_bad_annotation() -> None:
    source = kv_event_source.new_kv_events_data_source("kv", {"port": 6000})
    rank2 = Endpoint(EndpointKey("ns/p-rank-2"), "p", "ns", "10.0.0.9", 8002, rank=2)
    assert source.publisher_address(rank2) == "tcp://10.0.0.9:6002"
    bad = endpoint(annotations={"sluice.io/kv-events-port": "http"})
    with pytest.raises(Exception, match=r"annotation sluice.io/kv-events-port='http' is not"):
        source.publisher_address(bad)


async def test_bind_mode_sorts_messages_by_topic(context: zmq.Context) -> None:
    port = free_port()
    source = kv_event_source.new_kv_events_data_source(
        "kv", {"mode": "bind", "bindAddress": f"tcp://127.0.0.1:{port}"}
    )
    mine, other = endpoint(8000), endpoint(8001)
    await source.fetch(mine)  # binds, and registers both endpoints as known
    await source.fetch(other)
    publisher = context.socket(zmq.PUB)
    publisher.connect(f"tcp://127.0.0.1:{port}")
    dropped = metrics.kv_event_messages_dropped_total.labels("unknown_topic")._value.get()

    def publish(seq: int) -> None:
        publisher.send_multipart(batch(seq, "kv@127.0.0.1:8000@m"))
        publisher.send_multipart(batch(seq, "kv@127.0.0.1:8001@m"))
        publisher.send_multipart(batch(seq, "kv@10.9.9.9:8000@m"))
        publisher.send_multipart([b"kv@127.0.0.1:8000@m", b"short"])  # malformed

    malformed = metrics.kv_event_messages_dropped_total.labels("malformed")._value.get()
    try:
        got = await received(source, mine, publish)
        assert {b.topic for b in got} == {"kv@127.0.0.1:8000@m"}
        assert {b.topic for b in (await source.fetch(other)).batches} == {"kv@127.0.0.1:8001@m"}
        labels = metrics.kv_event_messages_dropped_total.labels
        assert labels("unknown_topic")._value.get() > dropped
        assert labels("malformed")._value.get() > malformed
    finally:
        source.close()


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"mode": "push"}, "mode: must be 'connect' or 'bind', got 'push'"),
        ({"mode": "bind"}, "bindAddress: required with mode: bind"),
        ({"bindAddress": "tcp://*:5557"}, "bindAddress: only applies with mode: bind"),
        ({"mode": "bind", "bindAddress": "udp://x"}, "must be a tcp:// or ipc:// address"),
        ({"prot": 5557}, "prot: unknown parameter"),
    ],
)
def test_parameters_are_checked(params: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        kv_event_source.new_kv_events_data_source("kv", params)


PRECISE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: kv-events-data-source, parameters: {port: 5557}}
- {type: kv-events-extractor}
- {type: precise-prefix-cache-scorer}
- {type: queue-scorer}
data:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
  - pluginRef: kv-events-data-source
    extractors: [{pluginRef: kv-events-extractor}]
schedulingProfiles:
- name: default
  plugins: [{pluginRef: precise-prefix-cache-scorer}, {pluginRef: queue-scorer}]
"""


def test_config_wires_the_source_and_the_producer_reads_its_index() -> None:
    config = loader.load_config(PRECISE)
    assert [s.type_name for s in config.data_sources] == [
        "metrics-data-source",
        "kv-events-data-source",
    ]
    producer = config.plugins["precise-prefix-cache-producer"]
    extractor = config.plugins["kv-events-extractor"]
    assert producer.index is extractor.index  # type: ignore[attr-defined]
    # Reloading the same config keeps the index (and the sockets).
    again = loader.load_config(PRECISE, previous=config)
    assert again.plugins["kv-events-extractor"] is extractor
    assert again.data_sources == config.data_sources


def test_a_producer_without_a_wired_extractor_is_a_config_error() -> None:
    text = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: precise-prefix-cache-scorer}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: precise-prefix-cache-scorer}]
"""
    with pytest.raises(ConfigError, match="needs 'kv-events-extractor', which is not wired in"):
        loader.load_config(text)
