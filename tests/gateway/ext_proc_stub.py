"""A minimal ext_proc server for exercising the rendered Envoy configs (test scaffolding).

It speaks just enough of the endpoint-picker protocol to prove the configuration and the
message sequence: every request goes to one fixed destination. The real picker lives in
`epp.extproc`; nothing here is meant to be reused by it.

Each stream's messages are recorded as `Seen` entries, so tests can assert the exact
sequence Envoy sends (`shape` renders one stream as a compact string).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2

DESTINATION_HEADER = "x-gateway-destination-endpoint"
CHUNK_BYTES = 62_000
Mode = processing_mode_pb2.ProcessingMode


@dataclass(frozen=True)
class Seen:
    kind: str  # request_headers, request_body, request_trailers, response_headers, ...
    end_of_stream: bool = False
    size: int = 0


def shape(stream: list[Seen]) -> str:
    """One stream as ``request_headers request_body* request_body! ...``: ``!`` marks
    end_of_stream, ``x*`` a run of one or more ``x`` messages without it."""
    parts: list[str] = []
    for seen in stream:
        part = seen.kind + ("!" if seen.end_of_stream else "")
        if seen.kind.endswith("_body") and not seen.end_of_stream:
            part += "*"
            if parts and parts[-1] == part:
                continue
        parts.append(part)
    return " ".join(parts)


@dataclass
class StubBehaviour:
    destination: str
    fallbacks: tuple[str, ...] = ()  # listed after the destination in envoy.lb metadata
    full_duplex_request: bool = True  # False: BUFFERED/STREAMED, answer each message at once
    full_duplex_response: bool = True
    answer_headers_first: bool = False  # answer request headers before the body arrives
    clear_route_cache: bool = True
    set_content_length: bool = True
    skip_response_body: bool = False  # mode_override on the response-headers answer
    echo_request_body: bool = True  # False: answer the headers but never send the body back
    immediate_status: int | None = None  # answer the complete request with this status
    abort_on_headers: bool = False  # fail the gRPC stream as soon as request headers arrive
    silent: bool = False  # read every message, answer none (a hung picker)
    extra_headers: dict[str, str] = field(default_factory=dict)


class StubPicker(pb_grpc.ExternalProcessorServicer):
    def __init__(self, behaviour: StubBehaviour) -> None:
        self.behaviour = behaviour
        self.streams: list[list[Seen]] = []
        self.metadata_contexts: list[dict[str, object]] = []
        self.request_headers: list[dict[str, str]] = []
        self.closed_streams = 0
        self.closed_at: list[float] = []  # time.monotonic() of each stream's end, in order
        self._closed = asyncio.Condition()

    async def wait_closed(self, count: int = 1, timeout_s: float = 10.0) -> None:
        """Until `count` streams have ended."""
        async with self._closed:
            await asyncio.wait_for(
                self._closed.wait_for(lambda: self.closed_streams >= count), timeout_s
            )

    async def Process(
        self, requests: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        stream = _Stream(self, context)
        self.streams.append(stream.seen)
        try:
            async for request in requests:
                for response in await stream.on(request):
                    yield response
                if stream.done:
                    return
        finally:
            self.closed_streams += 1
            self.closed_at.append(time.monotonic())
            async with self._closed:
                self._closed.notify_all()


class _Stream:
    """One HTTP request: the state the stub keeps between messages."""

    def __init__(self, picker: StubPicker, context: grpc.aio.ServicerContext) -> None:
        self.picker = picker
        self.behaviour = picker.behaviour
        self.context = context
        self.seen: list[Seen] = []
        self.body = bytearray()
        self.routed = False
        self.done = False

    async def on(self, request: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        kind = request.WhichOneof("request")
        if self.behaviour.silent:
            self.seen.append(Seen(str(kind)))
            return []
        if request.HasField("metadata_context"):
            self.picker.metadata_contexts.append(_metadata_dict(request.metadata_context))
        if kind == "request_headers":
            return await self._request_headers(request.request_headers)
        if kind == "request_body":
            return self._request_body(request.request_body)
        if kind == "request_trailers":
            self.seen.append(Seen(kind))
            # Trailers end the body: the unanswered rest goes out before the trailers answer.
            return [*self._route_once(), *_streamed("request_body", self._take(), end=False),
                    pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]  # fmt: skip
        if kind == "response_headers":
            self.seen.append(Seen(kind, request.response_headers.end_of_stream))
            return [self._response_headers()]
        if kind == "response_body":
            message = request.response_body
            self.seen.append(Seen(kind, message.end_of_stream, len(message.body)))
            if self.behaviour.full_duplex_response:
                return _streamed("response_body", message.body, message.end_of_stream)
            return [pb.ProcessingResponse(response_body=pb.BodyResponse())]
        self.seen.append(Seen(str(kind)))
        return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]

    async def _request_headers(self, message: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        self.seen.append(Seen("request_headers", message.end_of_stream))
        headers = {h.key: h.raw_value.decode() or h.value for h in message.headers.headers}
        self.picker.request_headers.append(headers)
        if self.behaviour.abort_on_headers:
            await self.context.abort(grpc.StatusCode.UNAVAILABLE, "stub picker is broken")
        if (
            message.end_of_stream
            or self.behaviour.answer_headers_first
            or not self.behaviour.full_duplex_request
        ):
            return self._route_once(0 if message.end_of_stream else None)
        return []

    def _request_body(self, message: pb.HttpBody) -> list[pb.ProcessingResponse]:
        self.seen.append(Seen("request_body", message.end_of_stream, len(message.body)))
        if not self.behaviour.full_duplex_request:
            return [pb.ProcessingResponse(request_body=pb.BodyResponse())]
        self.body += message.body
        if not message.end_of_stream:
            # Once routed, chunks pass straight through; before that they are buffered.
            return _streamed("request_body", self._take(), end=False) if self.routed else []
        if self.behaviour.immediate_status is not None:
            self.done = True
            return [_immediate(self.behaviour.immediate_status)]
        responses = self._route_once(len(self.body))
        if self.behaviour.echo_request_body:
            responses += _streamed("request_body", self._take(), end=True)
        return responses

    def _take(self) -> bytes:
        taken = bytes(self.body)
        self.body.clear()
        return taken

    def _route_once(self, content_length: int | None = None) -> list[pb.ProcessingResponse]:
        if self.routed:
            return []
        self.routed = True
        pairs = [(DESTINATION_HEADER, self.behaviour.destination)]
        pairs += list(self.behaviour.extra_headers.items())
        if content_length is not None and self.behaviour.set_content_length:
            pairs.append(("content-length", str(content_length)))
        common = pb.CommonResponse(
            clear_route_cache=self.behaviour.clear_route_cache,
            header_mutation=pb.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                    for key, value in pairs
                ]
            ),
        )
        metadata = struct_pb2.Struct()
        listed = ",".join((self.behaviour.destination, *self.behaviour.fallbacks))
        metadata.update({"envoy.lb": {DESTINATION_HEADER: listed}})
        response = pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata
        )
        return [response]

    def _response_headers(self) -> pb.ProcessingResponse:
        response = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        if self.behaviour.skip_response_body:
            response.mode_override.CopyFrom(
                Mode(response_body_mode=Mode.NONE, response_trailer_mode=Mode.SKIP)
            )
        return response


def _immediate(status: int) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            body=f"inference error: stub - status {status}".encode(),
        )
    )


def _streamed(kind: str, body: bytes, end: bool) -> list[pb.ProcessingResponse]:
    """`body` as StreamedBodyResponse messages of at most CHUNK_BYTES each."""
    chunks = [body[i : i + CHUNK_BYTES] for i in range(0, len(body), CHUNK_BYTES)] or [b""]
    responses = []
    for index, chunk in enumerate(chunks):
        streamed = pb.StreamedBodyResponse(
            body=chunk, end_of_stream=end and index == len(chunks) - 1
        )
        mutation = pb.CommonResponse(body_mutation=pb.BodyMutation(streamed_response=streamed))
        responses.append(pb.ProcessingResponse(**{kind: pb.BodyResponse(response=mutation)}))
    return responses


def _metadata_dict(metadata: base_pb2.Metadata) -> dict[str, object]:
    return {
        namespace: json_format.MessageToDict(value)
        for namespace, value in metadata.filter_metadata.items()
    }


async def serve(
    behaviour: StubBehaviour, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.aio.Server, int, StubPicker]:
    """Start the stub on 127.0.0.1 and a kernel-chosen port: (server, port, servicer)."""
    server = grpc.aio.server()
    picker = StubPicker(behaviour)
    pb_grpc.add_ExternalProcessorServicer_to_server(picker, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port, picker


async def stop(server: grpc.aio.Server) -> None:
    await server.stop(grace=None)
    await asyncio.sleep(0)
