"""A do-nothing ext_proc server: the protocol floor the picker is compared against.

It exchanges exactly the messages the picker does, but parses nothing, scores nothing and
counts nothing. Routing is round-robin over `--endpoints`.

* Full duplex: buffer the request body, answer with a destination header and the body;
  pass response chunks through.
* Any other mode (the shipped buffered request / streamed response): answer the request
  headers at once, the body with the destination header (body unchanged), and the
  response headers with the mode_override that skips the response body — as the picker
  does for every response it does not sample.

    python bench/null_extproc.py --port 9100 --endpoints 127.0.0.1:8000,127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp import cli as picker_cli

CHUNK = 62_000


FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
SKIP_BODY = processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.NONE,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
)


class NullProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, endpoints: list[str]) -> None:
        self._next = itertools.cycle(endpoints).__next__

    def _destination(self, body_length: int | None) -> pb.HeaderMutation:
        headers = [
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(
                    key="x-gateway-destination-endpoint", raw_value=self._next().encode()
                )
            )
        ]
        if body_length is not None:
            headers.append(
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(
                        key="content-length", raw_value=str(body_length).encode()
                    )
                )
            )
        return pb.HeaderMutation(set_headers=headers)

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        body: list[bytes] = []
        full_duplex = True
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            kind = message.WhichOneof("request")
            if message.HasField("protocol_config"):
                full_duplex = message.protocol_config.request_body_mode == FULL_DUPLEX
            if not full_duplex:
                await self._buffered(context, message, kind)
                continue
            if kind == "request_body":
                body.append(message.request_body.body)
                if not message.request_body.end_of_stream:
                    continue
                whole = b"".join(body)
                headers = self._destination(len(whole))
                await context.write(
                    pb.ProcessingResponse(
                        request_headers=pb.HeadersResponse(
                            response=pb.CommonResponse(
                                clear_route_cache=True, header_mutation=headers
                            )
                        )
                    )
                )
                chunks = [whole[i : i + CHUNK] for i in range(0, len(whole), CHUNK)] or [b""]
                for i, chunk in enumerate(chunks):
                    await context.write(_streamed(chunk, i == len(chunks) - 1, response_side=False))
            elif kind == "response_headers":
                await context.write(pb.ProcessingResponse(response_headers=pb.HeadersResponse()))
            elif kind == "response_body":
                rb = message.response_body
                await context.write(_streamed(rb.body, rb.end_of_stream, response_side=True))
            elif kind == "request_trailers":
                await context.write(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
            elif kind == "response_trailers":
                await context.write(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))

    async def _buffered(
        self, context: grpc.aio.ServicerContext, message: pb.ProcessingRequest, kind: str
    ) -> None:
        if kind == "request_headers":
            await context.write(pb.ProcessingResponse(request_headers=pb.HeadersResponse()))
        elif kind == "request_body":
            common = pb.CommonResponse(
                clear_route_cache=True, header_mutation=self._destination(None)
            )
            answer = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
            await context.write(answer)
        elif kind == "response_headers":
            answer = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            answer.mode_override.CopyFrom(SKIP_BODY)
            await context.write(answer)
        elif kind == "response_body":
            await context.write(pb.ProcessingResponse(response_body=pb.BodyResponse()))


def _streamed(chunk: bytes, end: bool, *, response_side: bool) -> pb.ProcessingResponse:
    body = pb.BodyResponse(
        response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(
                streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end)
            )
        )
    )
    if response_side:
        return pb.ProcessingResponse(response_body=body)
    return pb.ProcessingResponse(request_body=body)


async def serve(port: int, endpoints: list[str]) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(endpoints), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    # The same garbage-collector settings as `sluice picker`, so the floor is comparable.
    picker_cli.tune_garbage_collector()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--endpoints", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.endpoints.split(",")))


if __name__ == "__main__":
    main()
