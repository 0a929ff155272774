"""One ext_proc stream = one HTTP request: the protocol state machine.

`RequestStream.handle(message)` takes each ProcessingRequest Envoy sends and returns the
ProcessingResponses to write back, in order. It knows the protocol (phases, body modes,
chunking, header echo); what to route where is the director's business.

Body modes: with FULL_DUPLEX_STREAMED (the default Envoy config) Envoy does not wait for
answers, so the picker buffers the request body, and after the last chunk answers with the
routing headers followed by the body. With BUFFERED (or any other mode) Envoy waits for an
answer to each message, so headers are acknowledged at once and the routing headers ride
on the answer to the body.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Mapping

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.extproc import messages
from epp.requestcontrol.context import RequestContext
from epp.requestcontrol.director import Director
from epp.requests import errors
from epp.requests.usage import SSEUsageReader, usage_from_json

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED

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
    DONE = "done"


class RequestStream:
    __slots__ = (
        "_director",
        "_max_body_bytes",
        "_request_mode",
        "_response_buffer",
        "_response_mode",
        "_sse",
        "ctx",
        "phase",
    )

    def __init__(self, director: Director, max_body_bytes: int) -> None:
        self._director = director
        self._max_body_bytes = max_body_bytes
        self._request_mode = FULL_DUPLEX
        self._response_mode = FULL_DUPLEX
        self._response_buffer: list[bytes] = []
        self._sse: SSEUsageReader | None = None
        self.ctx = RequestContext()
        self.phase = Phase.START

    async def handle(self, message: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        kind = message.WhichOneof("request")
        try:
            if kind == "request_headers":
                return self._on_request_headers(message)
            if kind == "request_body":
                return await self._on_request_body(message.request_body)
            if kind == "request_trailers":
                return await self._on_request_trailers()
            if kind == "response_headers":
                return self._on_response_headers(message.response_headers)
            if kind == "response_body":
                return self._on_response_body(message.response_body)
            if kind == "response_trailers":
                return self._on_response_trailers()
            raise errors.bad_request("ext_proc message carries no request phase")
        except errors.InferenceError as error:
            self.phase = Phase.DONE
            self._director.fail(self.ctx, error)
            return [messages.immediate_response(error)]

    def close(self) -> None:
        """The stream ended (normally, cancelled, or broken): release whatever is held."""
        self._director.complete(self.ctx, completed=self.phase is Phase.DONE)
        self.phase = Phase.DONE

    # ---- request side ---------------------------------------------------------------

    def _expect(self, phase: Phase, what: str) -> None:
        if self.phase is not phase:
            raise errors.bad_request(
                f"ext_proc protocol: {what} arrived in phase '{self.phase.value}'"
            )

    def _on_request_headers(self, message: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        self._expect(Phase.START, "request headers")
        if message.HasField("protocol_config"):
            self._request_mode = message.protocol_config.request_body_mode
            self._response_mode = message.protocol_config.response_body_mode
        ctx = self.ctx
        headers = ctx.headers
        for item in message.request_headers.headers.headers:
            name = item.key.lower()
            if item.raw_value:
                try:
                    headers[name] = item.raw_value.decode()
                except UnicodeDecodeError:
                    raise errors.bad_request(f"header {name!r} is not valid UTF-8") from None
            else:
                headers[name] = item.value
        ctx.request_id = headers.get("x-request-id") or str(uuid.uuid4())
        ctx.path = (
            headers.get(":path")
            or headers.get("x-original-path")
            or headers.get("x-forwarded-path", "")
        )
        ctx.subset = _subset_hint(message.metadata_context.filter_metadata)
        if message.request_headers.end_of_stream:
            self._director.route_header_only(ctx)
            self.phase = Phase.UPSTREAM
            return [
                messages.request_headers_response(
                    messages.routing_mutation(
                        ctx.primary_target, ctx.request_id, None, self._echo()
                    ),
                    ctx.destination,
                )
            ]
        self.phase = Phase.REQUEST_BODY
        if self._request_mode == FULL_DUPLEX:
            return []
        return [messages.request_headers_response()]

    async def _on_request_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        self._expect(Phase.REQUEST_BODY, "a request body chunk")
        ctx = self.ctx
        if body.body:
            ctx.body_size += len(body.body)
            if ctx.body_size > self._max_body_bytes:
                raise errors.too_large(
                    f"request body exceeds the limit of {self._max_body_bytes} bytes"
                )
            ctx.body_chunks.append(body.body)
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
        ctx = self.ctx
        await self._director.route(ctx)
        self.phase = Phase.UPSTREAM
        destination = ctx.destination
        body_out = ctx.body_out
        mutation = messages.routing_mutation(
            ctx.primary_target, ctx.request_id, len(body_out), self._echo()
        )
        if self._request_mode == FULL_DUPLEX:
            return [
                messages.request_headers_response(mutation, destination),
                *messages.streamed_body(body_out, end_of_stream=end_of_stream, response_side=False),
            ]
        if ctx.restorer is not None:  # the model was rewritten, so the body changed
            mutation.body_mutation.body = body_out
        return [messages.request_body_response(mutation, destination)]

    def _echo(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.ctx.headers.items() if _is_echoed(k)]

    # ---- response side --------------------------------------------------------------

    def _on_response_headers(self, headers: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        self._expect(Phase.UPSTREAM, "response headers")
        ctx = self.ctx
        for item in headers.headers.headers:
            name = item.key.lower()
            if name == ":status":
                value = item.raw_value or item.value.encode()
                ctx.response_status = int(value) if value.isdigit() else 0
            elif name == "content-type":
                value = item.raw_value or item.value.encode()
                ctx.response_streaming = value.startswith(b"text/event-stream")
        if ctx.response_streaming:
            self._sse = SSEUsageReader()
        if headers.end_of_stream:
            self.phase = Phase.DONE
            self._director.complete(ctx, completed=True)
        else:
            self.phase = Phase.RESPONSE_BODY
        return [messages.response_headers_response()]

    def _on_response_body(self, body: pb.HttpBody) -> list[pb.ProcessingResponse]:
        self._expect(Phase.RESPONSE_BODY, "a response body chunk")
        ctx = self.ctx
        now = time.monotonic()
        chunk = body.body
        if chunk:
            if not ctx.first_chunk_at:
                ctx.first_chunk_at = now
            ctx.last_chunk_at = now
        if self._response_mode != FULL_DUPLEX:
            return [self._finish_buffered_response(chunk)]
        if self._sse is not None:
            self._sse.feed(chunk)
            if ctx.restorer is not None:
                chunk = ctx.restorer.restore(chunk)
            if body.end_of_stream:
                ctx.usage = self._sse.finish()
                self._finish()
            return messages.streamed_body(
                chunk, end_of_stream=body.end_of_stream, response_side=True
            )
        if chunk:
            self._response_buffer.append(chunk)
        if not body.end_of_stream:
            return []
        whole = b"".join(self._response_buffer)
        self._response_buffer = []
        ctx.usage = usage_from_json(whole)
        if ctx.restorer is not None:
            whole = ctx.restorer.restore(whole)
        self._finish()
        return messages.streamed_body(whole, end_of_stream=True, response_side=True)

    def _finish_buffered_response(self, chunk: bytes) -> pb.ProcessingResponse:
        ctx = self.ctx
        if self._sse is not None:
            self._sse.feed(chunk)
            ctx.usage = self._sse.finish()
        else:
            ctx.usage = usage_from_json(chunk)
        replaced = ctx.restorer.restore(chunk) if ctx.restorer is not None else chunk
        self._finish()
        return messages.buffered_body_response(
            replaced if replaced is not chunk else None, response_side=True
        )

    def _on_response_trailers(self) -> list[pb.ProcessingResponse]:
        out: list[pb.ProcessingResponse] = []
        if self._sse is not None:
            self.ctx.usage = self._sse.finish()
        elif self._response_buffer:
            # Trailers end a buffered body whose last chunk did not say so: flush it.
            whole = b"".join(self._response_buffer)
            self._response_buffer = []
            self.ctx.usage = usage_from_json(whole)
            if self.ctx.restorer is not None:
                whole = self.ctx.restorer.restore(whole)
            out = messages.streamed_body(whole, end_of_stream=False, response_side=True)
        self._finish()
        return [*out, messages.trailers_response(response_side=True)]

    def _finish(self) -> None:
        self.phase = Phase.DONE
        self._director.complete(self.ctx, completed=True)


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
