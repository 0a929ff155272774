"""The gRPC server: ext_proc `Process` streams, health checks, optional TLS."""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from epp import metrics
from epp.extproc.body_budget import BodyBudget
from epp.extproc.stream import RequestStream
from epp.requestcontrol.director import Director

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)

DEFAULT_MAX_HELD_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0

_GRPC_OPTIONS = [
    # Bodies arrive in chunks, but a single BUFFERED body can be large.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


class ExternalProcessor:
    """The `Process` method, registered with raw-bytes (de)serializers: most messages are
    decoded into protobuf objects here, but a full-duplex response chunk that nothing
    needs is answered from its bytes (`RequestStream.pass_through`)."""

    def __init__(
        self,
        director: Director,
        max_body_bytes: int,
        *,
        max_held_body_bytes: int = DEFAULT_MAX_HELD_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self._director = director
        self._max_body_bytes = max_body_bytes
        self.body_budget = BodyBudget(max_held_body_bytes)
        self._body_timeout_s = body_timeout_s
        self.open_streams = 0
        metrics.request_body_bytes_held.set_function(lambda: self.body_budget.held)

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(self.Process)  # bytes in, bytes out
        return grpc.method_handlers_generic_handler(EXT_PROC_SERVICE, {"Process": method})

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        stream = RequestStream(
            self._director, self._max_body_bytes, self.body_budget, self._body_timeout_s
        )
        self.open_streams += 1
        ended = False
        parse = pb.ProcessingRequest.FromString
        try:
            while True:
                deadline = stream.body_deadline
                if deadline:
                    # A client that trickles its body (or stops) is answered at the
                    # deadline, and its body let go, instead of holding memory forever.
                    try:
                        async with asyncio.timeout_at(deadline):
                            raw = await context.read()
                    except TimeoutError:
                        await context.write(stream.body_timed_out().SerializeToString())
                        return
                else:
                    raw = await context.read()
                if raw is grpc.aio.EOF:
                    ended = True
                    return
                answer = stream.pass_through(raw)
                if answer is not None:
                    await context.write(answer)
                    continue
                try:
                    message = parse(raw)
                except DecodeError:
                    message = pb.ProcessingRequest()  # no phase: answered with a clear 400
                for response in await stream.handle(message):
                    await context.write(response.SerializeToString())
        finally:
            # Runs on normal end, on client cancellation (CancelledError) and on errors.
            stream.close(ended=ended)
            self.open_streams -= 1


@dataclass(frozen=True, slots=True)
class TlsFiles:
    certificate: bytes
    private_key: bytes


def load_or_create_tls(cert_path: Path | None) -> TlsFiles:
    """`--cert-path DIR` holds tls.crt and tls.key; without it, a self-signed pair."""
    if cert_path is not None:
        try:
            return TlsFiles(
                (cert_path / "tls.crt").read_bytes(), (cert_path / "tls.key").read_bytes()
            )
        except OSError as error:
            raise ValueError(f"--cert-path {cert_path}: {error.strerror or error}") from error
    return _self_signed()


def _self_signed() -> TlsFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluice-picker")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("sluice-picker")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return TlsFiles(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class PickerServer:
    """ext_proc on one port, gRPC health on another; `readiness` follows the datastore sync."""

    def __init__(
        self,
        director: Director,
        *,
        host: str = "0.0.0.0",
        grpc_port: int = 9002,
        health_port: int = 9003,
        tls: TlsFiles | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
        max_body_bytes_in_flight: int = DEFAULT_MAX_HELD_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.processor = ExternalProcessor(
            director,
            max_body_bytes,
            max_held_body_bytes=max_body_bytes_in_flight,
            body_timeout_s=body_timeout_s,
        )
        self.health = health.aio.HealthServicer()
        self._host = host
        self._grpc_port = grpc_port
        self._health_port = health_port
        self._tls = tls
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.health_port = 0

    async def start(self) -> None:
        self._server = grpc.aio.server(options=_GRPC_OPTIONS)
        self._server.add_generic_rpc_handlers((self.processor.handler(),))
        address = f"{self._host}:{self._grpc_port}"
        if self._tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(self._tls.private_key, self._tls.certificate)]
            )
            self.grpc_port = self._server.add_secure_port(address, credentials)
        else:
            self.grpc_port = self._server.add_insecure_port(address)
        self._health_server = grpc.aio.server(options=_GRPC_OPTIONS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        self.health_port = self._health_server.add_insecure_port(
            f"{self._host}:{self._health_port}"
        )
        for service in HEALTH_SERVICES:
            status = health_pb2.HealthCheckResponse.SERVING
            if service == "readiness":
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            await self._set_health(service, status)
        await self._server.start()
        await self._health_server.start()
        log.info(
            "picker listening", extra={"grpc_port": self.grpc_port, "health_port": self.health_port}
        )

    async def _set_health(self, service: str, status: int) -> None:
        await self.health.set(service, status)

    async def set_ready(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._set_health("readiness", status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight streams finish for up to `grace_s`."""
        await self.set_ready(False)
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
