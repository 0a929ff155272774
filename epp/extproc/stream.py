"""One ext_proc stream = one HTTP request: the protocol state machine.

`RequestStream.handle(message)` takes each ProcessingRequest Envoy sends and returns the
ProcessingResponses to write back, in order. It knows the protocol (phases, body modes,
chunking, header echo) and owns the request's wire state; what to route where is the
director's business. Once routed, the stream owns the `RoutedRequest` and finishes it
exactly once, in `close()`, which the server calls when the gRPC stream ends for any
reason (response complete, client gone, Envoy reset, protocol error).

Body modes: with FULL_DUPLEX_STREAMED (the default Envoy config) Envoy does not wait for
answers, so the picker buffers the request body, and after the last chunk answers with the
routing headers followed by the body. With BUFFERED (or any other mode) Envoy waits for an
answer to each message, so headers are acknowledged at once and the routing headers ride
on the answer to the body.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import time
import uuid
from collections.abc import Mapping

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp import errors
from epp.bodies.rewrite import ModelNameRestorer
from epp.bodies.usage import SSEUsageReader, usage_from_json
from epp.extproc import messages, wire
from epp.extproc.body_budget import BodyBudget
from epp.requestcontrol.director import Director
from epp.requestcontrol.request import InboundRequest, ResponseProgress, RoutedRequest

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
# Response body modes in which Envoy honours a mode_override that skips the body.
_SKIPPABLE = (BUFFERED, STREAMED)

# Headers the picker owns: never echoed back from the client's request.
_SYSTEM_PREFIXES = ("x-gateway-destination-endpoint", "x-gateway-inference-")
_SYSTEM_HEADERS = frozenset({"x-gateway-model-name-rewrite", "content-length", "x-request-id"})


def _is_echoed(name: str) -> bool:
    return not (
        name.startswith(":") or name in _SYSTEM_HEADERS or name.startswith(_SYSTEM_PREFIXES)
    )


class Phase(enum.Enum):
    START = "start"
    REQUEST_BODY = "request body"
    UPSTREAM = "upstream"  # routed; waiting for the response
    RESPONSE_BODY = "response body"
    DONE = "done"  # the response reached its end
    FAILED = "failed"  # answered with an error of the picker's own


class RequestStream:
    __slots__ = (
        "_body_budget",
        "_body_chunks",
        "_body_deadline",
        "_body_held",
        "_body_size",
        "_body_skipped",
        "_body_timeout_s",
        "_director",
        "_headers",
        "_max_body_bytes",
        "_observe",
        "_path",
        "_progress",
        "_received_at",
        "_request_id",
        "_request_mode",
        "_response_buffer",
        "_response_mode",
        "_restorer",
        "_routed",
        "_sse",
        "_subset",
        "_wants_chunks",
        "phase",
    )

    def __init__(
        self,
        director: Director,
        max_body_bytes: int,
        body_budget: BodyBudget | None = None,
        body_timeout_s: float = 0.0,
    ) -> None:
        self._director = director
        self._max_body_bytes = max_body_bytes
        self._body_budget = body_budget or BodyBudget(sys.maxsize)
        self._body_timeout_s = body_timeout_s  # 0: no deadline
        self._body_deadline = 0.0
        self._body_held = 0  # bytes taken from the budget
        self._request_mode = FULL_DUPLEX
        self._response_mode = FULL_DUPLEX
        self._headers: dict[str, str] = {}
        self._request_id = ""
        self._path = ""
        self._subset: frozenset[str] | None = None
        self._received_at = time.monotonic()
        self._body_chunks: list[bytes] = []
        self._body_size = 0
        self._routed: RoutedRequest | None = None
        self._restorer: ModelNameRestorer | None = None  # the routed request's, if any
        self._wants_chunks = False  # some lifecycle plugin reads response chunks
        self._observe = True  # time chunks, read usage: see RoutedRequest.observe
        self._body_skipped = False  # mode_override told Envoy not to send the response body
        self._progress = ResponseProgress()
        self._response_buffer: list[bytes] = []
        self._sse: SSEUsageReader | None = None
        self.phase = Phase.START

    async def handle(self, message: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        kind = message.WhichOneof("request")
        try:
            # Most frequent first: a streamed response is mostly body chunks.
            if kind == "response_body":
                responses = self._on_response_body(message.response_body)
            elif kind == "request_headers":
                responses = self._on_request_headers(message)
            elif kind == "request_body":
                responses = await self._on_request_body(message.request_body)
            elif kind == "response_headers":
                responses = self._on_response_headers(message.response_headers)
            elif kind == "request_trailers":
                responses = await self._on_request_trailers()
            elif kind == "response_trailers":
                responses = self._on_response_trailers()
            else:
                raise errors.bad_request("ext_proc message carries no request phase")
        except errors.InferenceError as error:
            if self.phase is not Phase.FAILED:  # the director counts the errors it raises
                routed = self._routed
                self._director.count_error(error, routed.labels if routed is not None else None)
            self.phase = Phase.FAILED
            self._drop_body()
            self._release()
            return [messages.immediate_response(error)]
        if self.phase is Phase.DONE:
            self._release()  # the response ended: release now, not when Envoy closes
        return responses

    def close(self, *, ended: bool = False) -> None:
        """The gRPC stream ended: `ended` when Envoy closed it cleanly (the HTTP stream is
        over), else it was cancelled or broke. A request not yet finished ends here: cut
        off, unless its response body was skipped and the stream ended cleanly — then the
        response completed without the picker seeing its body."""
        if ended and self._body_skipped and self.phase is Phase.RESPONSE_BODY:
            self.phase = Phase.DONE
        self._drop_body()
        self._release()

    @property
    def body_deadline(self) -> float:
        """When the request body must be complete (event-loop time); 0.0: not waiting."""
        return self._body_deadline if self.phase is Phase.REQUEST_BODY else 0.0

    def body_timed_out(self) -> pb.ProcessingResponse:
        """The answer when the body missed its deadline: 408, and the body let go."""
        error = errors.InferenceError(
            408,
            "RequestTimeout",
            f"request body not complete within {self._body_timeout_s:g}s of its headers",
        )
        self._director.count_error(error)
        self.phase = Phase.FAILED
        self._drop_body()
        return messages.immediate_response(error)

    def _drop_body(self) -> None:
        self._body_chunks = []
        if self._body_held:
            self._body_budget.give_back(self._body_held)
            self._body_held = 0

    def pass_through(self, raw: bytes) -> bytes | None:
        """The answer to a response chunk that only needs timing and, when sampled, a look
        for SSE usage, built from its bytes (see `wire`); None when the message needs the
        ordinary path (another phase, a model name to restore, a plugin reading chunks, a
        JSON body to hold until it is whole)."""
        if self.phase is not Phase.RESPONSE_BODY or self._restorer is not None:
            return None
        full_duplex = self._response_mode == FULL_DUPLEX
        sse = self._sse
        if (
            self._wants_chunks
            or (self._observe and sse is None)
            or not (full_duplex or self._response_mode == STREAMED)
        ):
            return None
        found = wire.response_chunk(raw)
        if found is None:
            return None
        start, end, end_of_stream = found
        if sse is not None:  # observed: usage rides in an SSE event
            body = wire.body_bytes(raw, start)
            if body:
                self._time_chunk()
                sse.feed(body)
            if end_of_stream:
                self._progress.usage = sse.finish()
        elif wire.body_size(raw, start):
            self._time_chunk()
        if end_of_stream:
            self.phase = Phase.DONE
            self._release()
        if full_duplex:
            return wire.pass_through(raw, start, end)
        return wire.CONTINUE_RESPONSE_BODY

    def _release(self) -> None:
        """Finish the routed request; ownership moves out, so this acts at most once."""
        routed, self._routed = self._routed, None
        if routed is not None:
            routed.finish(self._progress, completed=self.phase is Phase.DONE)

    # ---- request side ---------------------------------------------------------------

    def _expect(self, phase: Phase, what: str) -> None:
        if self.phase is not phase:
            raise errors.bad_request(
                f"ext_proc protocol: {what} arrived in phase '{self.phase.value}'"
            )

    def _inbound(self, body: bytes) -> InboundRequest:
        return InboundRequest(
            request_id=self._request_id,
            path=self._path,
            headers=self._headers,
            body=body,
            subset=self._subset,
            received_at=self._received_at,
        )

    def _on_request_headers(self, message: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        self._expect(Phase.START, "request headers")
        if message.HasField("protocol_config"):
            self._request_mode = message.protocol_config.request_body_mode
            self._response_mode = message.protocol_config.response_body_mode
        headers = self._headers
        for item in message.request_headers.headers.headers:
            name = item.key.lower()
            if item.raw_value:
                try:
                    headers[name] = item.raw_value.decode()
                except UnicodeDecodeError:
                    raise errors.bad_request(f"header {name!r} is not valid UTF-8") from None
            else:
                headers[name] = item.value
        self._request_id = headers.get("x-request-id") or str(uuid.uuid4())
        self._path = (
            headers.get(":path")
            or headers.get("x-original-path")
            or headers.get("x-forwarded-path", "")
        )
        self._subset = _subset_hint(message.metadata_context.filter_metadata)
        if message.request_headers.end_of_stream:
            try:
                routed = self._director.route_header_only(self._inbound(b""))
            except errors.InferenceError:
                self.phase = Phase.FAILED
                raise
            self._routed = routed
            self._wants_chunks = routed.wants_chunks
            self._observe = routed.observe
            self.phase = Phase.UPSTREAM
            return [
                messages.request_headers_response(
                    messages.routing_mutation(
                        routed.primary_target, self._request_id, None, self._echo()
                    ),
                    routed.destination,
                )
            ]
        self.phase = Phase.REQUEST_BODY
        if self._body_timeout_s:
            self._body_deadline = asyncio.get_running_loop().time() + self._body_timeout_s
        if self._request_mode == FULL_DUPLEX:
            return []
        return [messages.request_headers_response()]

    async def _on_request_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        self._expect(Phase.REQUEST_BODY, "a request body chunk")
        chunk = body.body
        if chunk:
            size = len(chunk)
            self._body_size += size
            if self._body_size > self._max_body_bytes:
                raise errors.too_large(
                    f"request body exceeds the limit of {self._max_body_bytes} bytes"
                )
            budget = self._body_budget
            if not budget.take(size):
                raise errors.unavailable(
                    f"the picker holds {budget.held} bytes of request bodies in flight "
                    f"(limit {budget.max_bytes}); retry later"
                )
            self._body_held += size
            self._body_chunks.append(chunk)
        if not body.end_of_stream:
            if self._request_mode == FULL_DUPLEX:
                return []
            return [messages.buffered_body_response(None, response_side=False)]
        return await self._route(end_of_stream=True)

    async def _on_request_trailers(self) -> list[pb.ProcessingResponse]:
        trailers = messages.trailers_response(response_side=False)
        if self.phase is Phase.REQUEST_BODY:
            # Trailers end a body whose last chunk did not say so.
            return [*await self._route(end_of_stream=False), trailers]
        return [trailers]

    async def _route(self, *, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        chunks = self._body_chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._body_chunks = []
        try:
            # Counted against the budget while it waits (flow control) and is scheduled.
            routed = await self._director.route(self._inbound(body))
        except errors.InferenceError:
            self.phase = Phase.FAILED
            raise
        finally:
            self._drop_body()
        self._routed = routed
        self._restorer = routed.restorer
        self._wants_chunks = routed.wants_chunks
        self._observe = routed.observe
        self.phase = Phase.UPSTREAM
        body_out = routed.body
        routed.body = b""  # sent on below; the request's lifetime must not keep it
        mutation = messages.routing_mutation(
            routed.primary_target, self._request_id, len(body_out), self._echo()
        )
        if self._request_mode == FULL_DUPLEX:
            return [
                messages.request_headers_response(mutation, routed.destination),
                *messages.streamed_body(body_out, end_of_stream=end_of_stream, response_side=False),
            ]
        if routed.restorer is not None:  # the model was rewritten, so the body changed
            mutation.body_mutation.body = body_out
        return [messages.request_body_response(mutation, routed.destination)]

    def _echo(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self._headers.items() if _is_echoed(k)]

    # ---- response side --------------------------------------------------------------

    def _on_response_headers(self, headers: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        self._expect(Phase.UPSTREAM, "response headers")
        progress = self._progress
        for item in headers.headers.headers:
            name = item.key.lower()
            if name == ":status":
                value = item.raw_value or item.value.encode()
                progress.status = int(value) if value.isdigit() else 0
            elif name == "content-type":
                value = item.raw_value or item.value.encode()
                progress.streaming = value.startswith(b"text/event-stream")
        if progress.streaming and self._observe:
            self._sse = SSEUsageReader()
        if self._routed is not None:
            self._routed.response_received(progress.status, progress.streaming)
        if headers.end_of_stream:
            self.phase = Phase.DONE
            return [messages.response_headers_response()]
        self.phase = Phase.RESPONSE_BODY
        # Nothing needs this response's body: a gateway that allows it (not full duplex)
        # stops sending it; the stream still ends only when the HTTP response does.
        skip = not self._observe and self._response_mode in _SKIPPABLE
        self._body_skipped = skip
        return [messages.response_headers_response(skip_body=skip)]

    def _time_chunk(self) -> None:
        progress = self._progress
        now = time.monotonic()
        if not progress.first_chunk_at:
            progress.first_chunk_at = now
        progress.last_chunk_at = now

    def _on_response_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        self._expect(Phase.RESPONSE_BODY, "a response body chunk")
        chunk, end_of_stream = body.body, body.end_of_stream
        if chunk:
            self._time_chunk()
        if self._wants_chunks and self._routed is not None:
            self._routed.response_chunk(chunk, end_of_stream)
        if not self._observe:  # passed on untouched (full duplex: see pass_through)
            if end_of_stream:
                self.phase = Phase.DONE
            if self._response_mode != FULL_DUPLEX:
                return [messages.buffered_body_response(None, response_side=True)]
            return messages.streamed_body(chunk, end_of_stream=end_of_stream, response_side=True)
        if self._response_mode != FULL_DUPLEX:
            # STREAMED: an answer per chunk; BUFFERED: the one chunk is the whole body.
            return [self._answer_chunk(chunk, end_of_stream)]
        restorer = self._restorer
        if self._sse is not None:
            self._sse.feed(chunk)
            if restorer is not None:
                chunk = restorer.restore(chunk)
            if end_of_stream:
                self._progress.usage = self._sse.finish()
                self.phase = Phase.DONE
            return messages.streamed_body(chunk, end_of_stream=end_of_stream, response_side=True)
        # A JSON body is held until it is whole: its usage, and the model name to restore.
        if chunk:
            self._response_buffer.append(chunk)
        if not end_of_stream:
            return []
        self.phase = Phase.DONE
        return messages.streamed_body(self._flush_buffer(), end_of_stream=True, response_side=True)

    def _flush_buffer(self) -> bytes:
        """The buffered (non-streaming) response body, usage read, model name restored."""
        whole = b"".join(self._response_buffer)
        self._response_buffer = []
        self._progress.usage = usage_from_json(whole)
        restorer = self._restorer
        return restorer.restore(whole) if restorer is not None else whole

    def _answer_chunk(self, chunk: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
        """A chunk Envoy waits for an answer to: read for usage, the model name restored."""
        if self._sse is not None:
            self._sse.feed(chunk)
            if end_of_stream:
                self._progress.usage = self._sse.finish()
        elif chunk:
            self._response_buffer.append(chunk)
        if end_of_stream:
            if self._sse is None:
                self._progress.usage = usage_from_json(b"".join(self._response_buffer))
                self._response_buffer = []
            self.phase = Phase.DONE
        restorer = self._restorer
        replaced = restorer.restore(chunk) if restorer is not None else chunk
        return messages.buffered_body_response(
            replaced if replaced is not chunk else None, response_side=True
        )

    def _on_response_trailers(self) -> list[pb.ProcessingResponse]:
        out: list[pb.ProcessingResponse] = []
        if self._sse is not None:
            self._progress.usage = self._sse.finish()
        elif self._response_buffer:
            # Trailers end a buffered body whose last chunk did not say so: flush it.
            out = messages.streamed_body(
                self._flush_buffer(), end_of_stream=False, response_side=True
            )
        self.phase = Phase.DONE
        return [*out, messages.trailers_response(response_side=True)]


def _subset_hint(filter_metadata: Mapping[str, object]) -> frozenset[str] | None:
    if messages.SUBSET_HINT_NAMESPACE not in filter_metadata:
        return None
    hint = filter_metadata[messages.SUBSET_HINT_NAMESPACE]
    fields = getattr(hint, "fields", {})
    if messages.SUBSET_HINT_KEY not in fields:
        return None
    addresses: set[str] = set()
    for value in fields[messages.SUBSET_HINT_KEY].list_value.values:
        text = value.string_value
        host, sep, port = text.rpartition(":")
        addresses.add((host if sep and port.isdigit() else text).strip("[]"))
    return frozenset(addresses)
