"""`kv-events-data-source`: the KV-cache events model servers publish over ZMQ.

Events are pushed, the data layer pulls: the source keeps SUB sockets open, ZMQ queues
what arrives between ticks, and each collector tick of an endpoint drains that endpoint's
messages without waiting (at most `maxMessagesPerTick`) and hands them, decoded, to the
extractor (`kv-events-extractor`), which applies them to the block index. So events land
in the index within one refresh interval (50 ms by default) of arriving, a tick never
waits on a server, and the source never fails a tick: a server that publishes nothing
simply has nothing to drain.

Two ways to meet the publishers, as vLLM either binds or connects (it binds when its
`--kv-events-config` endpoint has `*`, `::` or `ipc://`, else connects):

* `mode: connect` (default): one SUB socket per endpoint, connected to the endpoint's IP
  at the port of the pod annotation `portAnnotation` (`sluice.io/kv-events-port`), else
  `port` (5557, vLLM's default), plus the endpoint's rank (data-parallel ranks publish
  on consecutive ports). ZMQ reconnects by itself when a server restarts.
* `mode: bind`: one SUB socket bound at `bindAddress` that every server connects to. The
  topic says who sent a message, so servers must publish with vLLM's topic convention
  `kv@<ip>:<port>@<model>`, `<ip>:<port>` being the endpoint's address; messages naming
  no endpoint of the pool are dropped and counted.

`topic` (empty: all) is the ZMQ subscription prefix. Messages published before the
socket connected are lost (ZMQ PUB/SUB keeps nothing); the extractor sees the first
sequence number it gets as its starting point.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import zmq

from epp import metrics, parameters
from epp.datalayer import interfaces, kv_events
from epp.datastore.snapshot import Endpoint, host_port

logger = logging.getLogger(__name__)

TYPE_NAME: Final = "kv-events-data-source"
DEFAULT_PORT: Final = 5557
DEFAULT_PORT_ANNOTATION: Final = "sluice.io/kv-events-port"
DEFAULT_MAX_MESSAGES_PER_TICK: Final = 10_000
# Messages ZMQ queues per socket before it drops (the extractor then sees a gap).
_RECEIVE_HIGH_WATER_MARK: Final = 100_000

_MALFORMED = metrics.kv_event_messages_dropped_total.labels("malformed")
_UNKNOWN_TOPIC = metrics.kv_event_messages_dropped_total.labels("unknown_topic")


@dataclass(frozen=True, slots=True)
class KvEventMessages:
    """What one endpoint published since its previous tick, oldest first."""

    batches: tuple[kv_events.EventBatch, ...]


@dataclass(frozen=True, slots=True)
class KvEventSettings:
    mode: str = "connect"
    port: int = DEFAULT_PORT
    port_annotation: str = DEFAULT_PORT_ANNOTATION
    bind_address: str = ""
    topic: str = ""
    max_messages_per_tick: int = DEFAULT_MAX_MESSAGES_PER_TICK


class KvEventsDataSource:
    """SUB sockets to the model servers' KV-event publishers, drained once per tick."""

    type_name: Final = TYPE_NAME
    output_type: Final = KvEventMessages

    def __init__(self, name: str = TYPE_NAME, settings: KvEventSettings | None = None) -> None:
        self._name = name
        self.settings = settings if settings is not None else KvEventSettings()
        self._extractors: tuple[interfaces.Extractor, ...] = ()
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sockets: dict[str, zmq.Socket[bytes]] = {}  # connect mode, by endpoint target
        self._collector: zmq.Socket[bytes] | None = None  # bind mode
        self._pending: dict[str, collections.deque[kv_events.EventBatch]] = {}  # bind mode

    @property
    def name(self) -> str:
        return self._name

    @property
    def extractors(self) -> Sequence[interfaces.Extractor]:
        return self._extractors

    def add_extractor(self, extractor: interfaces.Extractor) -> None:
        interfaces.check_wiring(self, extractor)
        self._extractors = (*self._extractors, extractor)

    def same_settings(self, other: object) -> bool:
        return isinstance(other, KvEventsDataSource) and other.settings == self.settings

    def publisher_address(self, endpoint: Endpoint) -> str:
        """Where connect mode subscribes for `endpoint`."""
        port = self.settings.port
        annotated = endpoint.annotations.get(self.settings.port_annotation)
        if annotated is not None:
            if not annotated.strip().isdigit() or not 1 <= int(annotated) <= 65535:
                raise interfaces.FetchError(
                    f"pod annotation {self.settings.port_annotation}={annotated!r} is not a "
                    "port number"
                )
            port = int(annotated)
        return f"tcp://{host_port(endpoint.address, port + endpoint.rank)}"

    async def fetch(self, endpoint: Endpoint) -> KvEventMessages:
        if self.settings.mode == "bind":
            return KvEventMessages(self._drain_collector(endpoint))
        socket = self._sockets.get(endpoint.target)
        if socket is None:
            socket = self._sockets[endpoint.target] = self._subscriber()
            socket.connect(self.publisher_address(endpoint))
        return KvEventMessages(tuple(self._drain(socket)))

    def forget(self, endpoint: Endpoint) -> None:
        socket = self._sockets.pop(endpoint.target, None)
        if socket is not None:
            socket.close(linger=0)
        self._pending.pop(endpoint.target, None)
        for extractor in self._extractors:
            forget = getattr(extractor, "forget", None)
            if callable(forget):
                forget(endpoint)

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close(linger=0)
        self._sockets.clear()
        if self._collector is not None:
            self._collector.close(linger=0)
            self._collector = None
        self._pending.clear()
        if self._context is not None:
            self._context.term()
            self._context = None

    def _subscriber(self) -> zmq.Socket[bytes]:
        if self._context is None:
            self._context = zmq.Context()
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.RCVHWM, _RECEIVE_HIGH_WATER_MARK)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SUBSCRIBE, self.settings.topic.encode())
        return socket

    def _drain(self, socket: zmq.Socket[bytes]) -> list[kv_events.EventBatch]:
        batches: list[kv_events.EventBatch] = []
        for _ in range(self.settings.max_messages_per_tick):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                batches.append(kv_events.decode(frames))
            except kv_events.MalformedMessage as exc:
                _MALFORMED.inc()
                logger.debug("dropped a KV-event message: %s", exc)
        return batches

    def _drain_collector(self, endpoint: Endpoint) -> tuple[kv_events.EventBatch, ...]:
        if self._collector is None:
            self._collector = self._subscriber()
            try:
                self._collector.bind(self.settings.bind_address)
            except zmq.ZMQError as exc:
                self._collector.close(linger=0)
                self._collector = None
                raise interfaces.FetchError(
                    f"cannot bind KV-event collector socket {self.settings.bind_address}: {exc}"
                ) from exc
        pending = self._pending
        if endpoint.target not in pending:
            pending[endpoint.target] = collections.deque()
        for batch in self._drain(self._collector):
            target = _topic_target(batch.topic)
            queue = pending.get(target) if target is not None else None
            if queue is None:
                _UNKNOWN_TOPIC.inc()
                logger.debug("dropped KV events of topic %r: no endpoint %s", batch.topic, target)
                continue
            queue.append(batch)
        mine = pending[endpoint.target]
        batches = tuple(mine)
        mine.clear()
        return batches


def _topic_target(topic: str) -> str | None:
    """`<ip>:<port>` of `kv@<ip>:<port>@<model>` (IPv6 as `[addr]:port`, as targets are)."""
    parts = topic.split("@")
    return parts[1] if len(parts) >= 2 and parts[1] else None


def new_kv_events_data_source(
    name: str, params: Mapping[str, object] | None = None
) -> KvEventsDataSource:
    """Registry factory: `mode`, `port`, `portAnnotation`, `bindAddress`, `topic`,
    `maxMessagesPerTick`."""
    reader = parameters.ParameterReader(params)
    mode = reader.string("mode", "connect")
    if mode not in ("connect", "bind"):
        raise parameters.ParameterError("mode", f"must be 'connect' or 'bind', got {mode!r}")
    settings = KvEventSettings(
        mode=mode,
        port=reader.integer("port", DEFAULT_PORT, minimum=1, maximum=65535),
        port_annotation=reader.string("portAnnotation", DEFAULT_PORT_ANNOTATION),
        bind_address=reader.string("bindAddress", ""),
        topic=reader.string("topic", "", non_empty=False),
        max_messages_per_tick=reader.integer(
            "maxMessagesPerTick", DEFAULT_MAX_MESSAGES_PER_TICK, minimum=1
        ),
    )
    reader.finish()
    if mode == "bind" and not settings.bind_address:
        raise parameters.ParameterError(
            "bindAddress", "required with mode: bind (e.g. 'tcp://*:5557')"
        )
    if mode == "connect" and reader.has("bindAddress"):
        raise parameters.ParameterError("bindAddress", "only applies with mode: bind")
    if settings.bind_address and not settings.bind_address.startswith(("tcp://", "ipc://")):
        raise parameters.ParameterError(
            "bindAddress", f"must be a tcp:// or ipc:// address, got {settings.bind_address!r}"
        )
    return KvEventsDataSource(name, settings)
