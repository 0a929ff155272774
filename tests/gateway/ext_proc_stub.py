"""A minimal ext_proc server for exercising the rendered Envoy configs (test scaffolding).

It speaks just enough of the endpoint-picker protocol to prove the configuration and the
message sequence: every request goes to one fixed destination. The real picker lives in
`epp.extproc`; nothing here is meant to be reused by it.

Each stream's messages are recorded as `Seen` entries, so tests can assert the exact
sequence Envoy sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

DESTINATION_HEADER = "x-gateway-destination-endpoint"
CHUNK_BYTES = 62_000


@dataclass(frozen=True)
class Seen:
    kind: str  # request_headers, request_body, request_trailers, response_headers, ...
    end_of_stream: bool = False
    size: int = 0


@dataclass
class StubBehaviour:
    destination: str
    full_duplex_request: bool = True
    full_duplex_response: bool = True
    answer_headers_first: bool = False  # answer request headers before the body arrives
    clear_route_cache: bool = True
    set_content_length: bool = True
    skip_response_body: bool = False  # mode_override on the response-headers answer
    echo_request_body: bool = True  # False: answer the headers but never send the body back
    close_after_request: bool = False  # end the gRPC stream once the request is forwarded
    immediate_status: int | None = None  # answer the complete request with this status
    extra_headers: dict[str, str] = field(default_factory=dict)


class StubPicker(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, behaviour: StubBehaviour) -> None:
        self.behaviour = behaviour
        self.streams: list[list[Seen]] = []
        self.metadata_contexts: list[dict[str, object]] = []
        self.request_headers: list[dict[str, str]] = []
        self.closed_streams = 0
        self.closed_at: list[float] = []  # loop.time() when each stream ended

    async def Process(
        self, requests: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        seen: list[Seen] = []
        self.streams.append(seen)
        body = bytearray()
        headers: dict[str, str] = {}
        sent_headers = False
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if request.HasField("metadata_context"):
                    self.metadata_contexts.append(_struct_dict(request.metadata_context))
                if kind == "request_headers":
                    msg = request.request_headers
                    seen.append(Seen(kind, msg.end_of_stream))
                    headers = {h.key: h.raw_value.decode() or h.value for h in msg.headers.headers}
                    self.request_headers.append(headers)
                    if msg.end_of_stream or self.behaviour.answer_headers_first:
                        sent_headers = True
                        yield self._route(len(body) if msg.end_of_stream else None)
                    elif not self.behaviour.full_duplex_request:
                        sent_headers = True
                        yield self._route(None)
                elif kind == "request_body":
                    msg = request.request_body
                    seen.append(Seen(kind, msg.end_of_stream, len(msg.body)))
                    if not self.behaviour.full_duplex_request:
                        yield pb.ProcessingResponse(request_body=pb.BodyResponse())
                        continue
                    body += msg.body
                    if msg.end_of_stream and self.behaviour.immediate_status is not None:
                        yield _immediate(self.behaviour.immediate_status)
                        return
                    if msg.end_of_stream:
                        if not sent_headers:
                            sent_headers = True
                            yield self._route(len(body))
                        if self.behaviour.echo_request_body:
                            for response in _streamed("request_body", bytes(body), end=True):
                                yield response
                        body.clear()
                        if self.behaviour.close_after_request:
                            return
                    elif sent_headers:
                        # Headers already answered: pass chunks straight through.
                        for response in _streamed("request_body", bytes(body), end=False):
                            yield response
                        body.clear()
                elif kind == "request_trailers":
                    seen.append(Seen(kind))
                    if not sent_headers:
                        sent_headers = True
                        yield self._route(len(body))
                    for response in _streamed("request_body", bytes(body), end=False):
                        yield response
                    body.clear()
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_headers":
                    seen.append(Seen(kind, request.response_headers.end_of_stream))
                    yield self._response_headers()
                elif kind == "response_body":
                    msg = request.response_body
                    seen.append(Seen(kind, msg.end_of_stream, len(msg.body)))
                    if self.behaviour.full_duplex_response:
                        for response in _streamed("response_body", msg.body, msg.end_of_stream):
                            yield response
                    else:
                        yield pb.ProcessingResponse(response_body=pb.BodyResponse())
                elif kind == "response_trailers":
                    seen.append(Seen(kind))
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        finally:
            del headers
            self.closed_streams += 1
            self.closed_at.append(asyncio.get_running_loop().time())

    def _route(self, content_length: int | None) -> pb.ProcessingResponse:
        set_headers = [(DESTINATION_HEADER, self.behaviour.destination)]
        set_headers += list(self.behaviour.extra_headers.items())
        if content_length is not None and self.behaviour.set_content_length:
            set_headers.append(("content-length", str(content_length)))
        common = pb.CommonResponse(
            clear_route_cache=self.behaviour.clear_route_cache,
            header_mutation=pb.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                    for k, v in set_headers
                ]
            ),
        )
        metadata = struct_pb2.Struct()
        metadata.update({"envoy.lb": {DESTINATION_HEADER: self.behaviour.destination}})
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata
        )

    def _response_headers(self) -> pb.ProcessingResponse:
        response = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        if self.behaviour.skip_response_body:
            mode = processing_mode_pb2.ProcessingMode
            response.mode_override.CopyFrom(
                mode(response_body_mode=mode.NONE, response_trailer_mode=mode.SKIP)
            )
        return response


def _immediate(status: int) -> pb.ProcessingResponse:
    from envoy.type.v3 import http_status_pb2

    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            body=f"inference error: stub - status {status}".encode(),
        )
    )


def _streamed(kind: str, body: bytes, end: bool) -> list[pb.ProcessingResponse]:
    chunks = [body[i : i + CHUNK_BYTES] for i in range(0, len(body), CHUNK_BYTES)] or [b""]
    return [
        pb.ProcessingResponse(
            **{
                kind: pb.BodyResponse(
                    response=pb.CommonResponse(
                        body_mutation=pb.BodyMutation(
                            streamed_response=pb.StreamedBodyResponse(
                                body=chunk, end_of_stream=end and i == len(chunks) - 1
                            )
                        )
                    )
                )
            }
        )
        for i, chunk in enumerate(chunks)
    ]


def _struct_dict(metadata: base_pb2.Metadata) -> dict[str, object]:
    from google.protobuf import json_format

    return {
        namespace: json_format.MessageToDict(value)
        for namespace, value in metadata.filter_metadata.items()
    }


async def serve(
    behaviour: StubBehaviour, host: str = "127.0.0.1"
) -> tuple[grpc.aio.Server, int, StubPicker]:
    """Start the stub on a kernel-chosen port; returns (server, port, servicer)."""
    server = grpc.aio.server()
    picker = StubPicker(behaviour)
    pb_grpc.add_ExternalProcessorServicer_to_server(picker, server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, port, picker


async def stop(server: grpc.aio.Server) -> None:
    await server.stop(grace=None)
    await asyncio.sleep(0)
