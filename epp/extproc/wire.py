"""The one message the picker answers without protobuf objects: a response body chunk it
passes on unchanged.

In FULL_DUPLEX_STREAMED mode (gateways configured by others) every response chunk reaches
the picker and must be sent back. When nothing needs the chunk (no model name to restore,
the request not sampled for measurement, no plugin reading chunks), decoding it into a
`ProcessingRequest`, building a `ProcessingResponse` and encoding that again is pure
overhead. The two messages nest the same bytes: Envoy's `HttpBody` and the
`StreamedBodyResponse` the picker answers with have the same fields under the same numbers
(body 1, end_of_stream 2, end_of_stream_without_message 3, grpc_message_compressed 4), so
the answer is the request's `HttpBody` bytes with four length-delimited headers put in
front:

    ProcessingRequest.response_body (5) = HttpBody
    ProcessingResponse.response_body (4) = BodyResponse
      .response (1) = CommonResponse .body_mutation (3) = BodyMutation
        .streamed_response (3) = StreamedBodyResponse  <- the HttpBody bytes, verbatim

In STREAMED mode (the shipped gateways, for a response the picker samples) Envoy waits for
an answer to each chunk, and the answer that changes nothing is two constant bytes.
Anything else (another field beside the body, another phase) takes the ordinary path.
"""

from __future__ import annotations

_RESPONSE_BODY_TAG = 0x2A  # ProcessingRequest field 5, wire type 2 (length-delimited)
_EOS_TAG = 0x10  # HttpBody field 2, wire type 0 (varint)
_BODY_TAG = 0x0A  # HttpBody field 1, wire type 2
# Outermost first: ProcessingResponse.response_body (4), BodyResponse.response (1),
# CommonResponse.body_mutation (3), BodyMutation.streamed_response (3).
_WRAPPERS = (0x22, 0x0A, 0x1A, 0x1A)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def response_chunk(raw: bytes) -> tuple[int, int, bool] | None:
    """(start, end, end_of_stream) of the `HttpBody` inside a message that is exactly one
    response body chunk; None for any other message."""
    if not raw or raw[0] != _RESPONSE_BODY_TAG:
        return None
    try:
        length, start = _read_varint(raw, 1)
        end = start + length
        if end != len(raw):  # another field follows: not ours to shortcut
            return None
        end_of_stream = False
        pos = start
        while pos < end:
            tag = raw[pos]
            if tag == _BODY_TAG:
                size, pos = _read_varint(raw, pos + 1)
                pos += size
            elif tag == _EOS_TAG:
                value, pos = _read_varint(raw, pos + 1)
                end_of_stream = value != 0
            else:  # fields 3 and 4, or something newer: take the ordinary path
                return None
        if pos != end:
            return None
    except (IndexError, ValueError):
        return None
    return start, end, end_of_stream


def body_size(raw: bytes, start: int) -> int:
    """Bytes of body in the chunk found by `response_chunk` (0 when it has none)."""
    if start >= len(raw) or raw[start] != _BODY_TAG:
        return 0
    return _read_varint(raw, start + 1)[0]


def body_bytes(raw: bytes, start: int) -> bytes:
    """The body of the chunk found by `response_chunk` (empty when it has none)."""
    if start >= len(raw) or raw[start] != _BODY_TAG:
        return b""
    size, pos = _read_varint(raw, start + 1)
    return raw[pos : pos + size]


# The answer to a response chunk in STREAMED mode that leaves it unchanged:
# ProcessingResponse.response_body (4) = an empty BodyResponse.
CONTINUE_RESPONSE_BODY = b"\x22\x00"


def pass_through(raw: bytes, start: int, end: int) -> bytes:
    """The `ProcessingResponse` that sends the chunk at raw[start:end] on unchanged."""
    size = end - start
    headers: list[bytes | memoryview] = []
    for tag in reversed(_WRAPPERS):  # innermost first: each length covers what is inside
        header = bytes((tag,)) + _varint(size)
        headers.append(header)
        size += len(header)
    headers.reverse()
    headers.append(memoryview(raw)[start:end])
    return b"".join(headers)  # one copy of the body
