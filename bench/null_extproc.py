"""A do-nothing ext_proc server: the protocol floor the picker is compared against.

It exchanges exactly the messages the picker does (buffer the request body, answer with
a destination header and the body; pass response chunks through), but parses nothing,
scores nothing and counts nothing. Routing is round-robin over `--endpoints`.

    python bench/null_extproc.py --port 9100 --endpoints 127.0.0.1:8000,127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp import cli as picker_cli

CHUNK = 62_000


class NullProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, endpoints: list[str]) -> None:
        self._next = itertools.cycle(endpoints).__next__

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        body: list[bytes] = []
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            kind = message.WhichOneof("request")
            if kind == "request_body":
                body.append(message.request_body.body)
                if not message.request_body.end_of_stream:
                    continue
                whole = b"".join(body)
                headers = pb.HeaderMutation(
                    set_headers=[
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(
                                key="x-gateway-destination-endpoint",
                                raw_value=self._next().encode(),
                            )
                        ),
                        base_pb2.HeaderValueOption(
                            header=base_pb2.HeaderValue(
                                key="content-length", raw_value=str(len(whole)).encode()
                            )
                        ),
                    ]
                )
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
