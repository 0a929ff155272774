"""Builders for the ProcessingResponse messages the picker sends back to Envoy."""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from epp.errors import InferenceError

DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_METADATA_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
MAX_CHUNK_BYTES = 62_000  # below Envoy's 64 KiB gRPC message comfort zone, as upstream does

_VALID_STATUS = set(http_status_pb2.StatusCode.values())


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
    )


def destination_metadata(destination: str) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({DESTINATION_METADATA_NAMESPACE: {DESTINATION_HEADER: destination}})
    return metadata


def routing_mutation(
    destination: str, request_id: str, body_length: int | None, echo: Iterable[tuple[str, str]]
) -> pb.CommonResponse:
    """Headers that send the request to `destination`, plus the echoed client headers."""
    set_headers = [header(DESTINATION_HEADER, destination), header("x-request-id", request_id)]
    if body_length is not None:
        set_headers.append(header("content-length", str(body_length)))
    set_headers.extend(header(k, v) for k, v in echo)
    return pb.CommonResponse(
        clear_route_cache=True,
        header_mutation=pb.HeaderMutation(set_headers=set_headers),
    )


def request_headers_response(
    common: pb.CommonResponse | None = None, destination: str | None = None
) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
    if destination is not None:
        response.dynamic_metadata.CopyFrom(destination_metadata(destination))
    return response


def request_body_response(
    common: pb.CommonResponse | None = None, destination: str | None = None
) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
    if destination is not None:
        response.dynamic_metadata.CopyFrom(destination_metadata(destination))
    return response


def streamed_body(
    body: bytes, *, end_of_stream: bool, response_side: bool
) -> list[pb.ProcessingResponse]:
    """The body as ≤62,000-byte streamed chunks; an empty body is one empty final chunk."""
    chunks = [body[i : i + MAX_CHUNK_BYTES] for i in range(0, len(body), MAX_CHUNK_BYTES)]
    if not chunks:
        chunks = [b""]
    out = []
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        mutation = pb.BodyMutation(
            streamed_response=pb.StreamedBodyResponse(
                body=chunk, end_of_stream=end_of_stream and i == last
            )
        )
        body_response = pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
        if response_side:
            out.append(pb.ProcessingResponse(response_body=body_response))
        else:
            out.append(pb.ProcessingResponse(request_body=body_response))
    return out


def buffered_body_response(body: bytes | None, *, response_side: bool) -> pb.ProcessingResponse:
    """Answer to a buffered body: replace it when `body` is given, else continue unchanged."""
    common = pb.CommonResponse()
    if body is not None:
        common.body_mutation.body = body
    body_response = pb.BodyResponse(response=common)
    if response_side:
        return pb.ProcessingResponse(response_body=body_response)
    return pb.ProcessingResponse(request_body=body_response)


_SKIP_RESPONSE_BODY = processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
)


def response_headers_response(*, skip_body: bool = False) -> pb.ProcessingResponse:
    """Answer to the response headers; `skip_body` asks Envoy (ext_proc `mode_override`,
    honoured when neither direction is full duplex) not to send the response body."""
    response = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if skip_body:
        response.mode_override.CopyFrom(_SKIP_RESPONSE_BODY)
    return response


def trailers_response(*, response_side: bool) -> pb.ProcessingResponse:
    if response_side:
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())


def immediate_response(error: InferenceError) -> pb.ProcessingResponse:
    status = error.status if error.status in _VALID_STATUS else 500
    headers = [header("content-type", "text/plain; charset=utf-8")]
    if error.retry_after_s is not None:
        headers.append(header("retry-after", str(error.retry_after_s)))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=pb.HeaderMutation(set_headers=headers),
            body=error.body,
            details=f"{error.code}: {error.message}"[:200],
        )
    )
