"""Speaks the ext_proc protocol to the picker the way Envoy does, message by message."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


def request_headers(
    headers: dict[str, str | bytes],
    *,
    end_of_stream: bool = False,
    subset: list[str] | None = None,
    request_mode: int = FULL_DUPLEX,
    response_mode: int = FULL_DUPLEX,
) -> pb.ProcessingRequest:
    values = []
    for key, value in headers.items():
        raw = value if isinstance(value, bytes) else value.encode()
        values.append(base_pb2.HeaderValue(key=key, raw_value=raw))
    message = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=values), end_of_stream=end_of_stream
        ),
        protocol_config=pb.ProtocolConfiguration(
            request_body_mode=request_mode,
            response_body_mode=response_mode,  # type: ignore[arg-type]
        ),
    )
    if subset is not None:
        hint = struct_pb2.Struct()
        hint.update({"x-gateway-destination-endpoint-subset": subset})
        message.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(hint)
    return message


def request_body(data: bytes, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def response_headers(
    status: int = 200, content_type: str = "application/json"
) -> pb.ProcessingRequest:
    values = [
        base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
        base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode()),
    ]
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values))
    )


def response_body(data: bytes, end_of_stream: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def completion_headers(
    path: str = "/v1/completions", **extra: str | bytes
) -> dict[str, str | bytes]:
    headers: dict[str, str | bytes] = {
        ":method": "POST",
        ":path": path,
        ":authority": "gateway",
        "content-type": "application/json",
    }
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


def set_headers(response: pb.ProcessingResponse) -> dict[str, str]:
    """The header mutation of a request-headers (or body) response, as a dict."""
    which = response.WhichOneof("response")
    common = getattr(response, which).response
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def streamed_bodies(responses: Iterable[pb.ProcessingResponse], side: str) -> bytes:
    out = b""
    for response in responses:
        if response.WhichOneof("response") == side:
            out += getattr(response, side).response.body_mutation.streamed_response.body
    return out


class ExtProcClient:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.channel = grpc.aio.insecure_channel(f"{host}:{port}")
        self.stub = pb_grpc.ExternalProcessorStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    def open(self) -> grpc.aio.StreamStreamCall:
        return self.stub.Process()

    async def exchange(
        self, messages: list[pb.ProcessingRequest], expect: int
    ) -> list[pb.ProcessingResponse]:
        """Send all messages, then read `expect` responses (or until the stream ends)."""
        call = self.open()
        for message in messages:
            await call.write(message)
        responses = []
        while len(responses) < expect:
            response = await call.read()
            if response is grpc.aio.EOF:
                break
            responses.append(response)
        await call.done_writing()
        return responses
