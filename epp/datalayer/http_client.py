"""A lean HTTP/1.1 GET client with one kept-alive connection per target, for scraping.

Why not aiohttp: the collector scrapes every endpoint every 50 ms, and aiohttp's general
machinery (request/response objects, header multidicts, cookie jar, tracing hooks, stream
readers) nearly doubles the CPU of a whole scrape (bench/datalayer_cost.py: ~135-165 µs
per scrape against ~70-80 µs with this client, extraction included). A scrape needs none
of it: one GET, a status code and a body. This client is an `asyncio.BufferedProtocol`
that writes a pre-built request head and parses the answer in one reused buffer: status
line, `Content-Length` or `Transfer-Encoding: chunked` (or a body that ends when the
server closes), keep-alive unless the server says `Connection: close`.

Connections: one per target (`host:port`), reused tick after tick. A request sent on a
kept-alive connection the server has meanwhile closed is retried once on a new
connection (a GET is idempotent, and this race is normal for idle keep-alive). A request
that is cancelled (the collector's timeout) or fails closes its connection, so a late
answer can never be read as the next request's. Only one request per connection at a
time; the collector's one-loop-per-endpoint design never asks for more, and a second
concurrent request to a target simply opens a second, unpooled connection.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from dataclasses import dataclass
from typing import Final

_UNREACHABLE_ERRNOS: Final = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH})
_MAX_HEAD_BYTES: Final = 64 * 1024
_INITIAL_BUFFER_BYTES: Final = 16 * 1024
_MIN_READ_BYTES: Final = 8 * 1024


class HttpError(Exception):
    """No usable answer: refused, reset, malformed, oversized, or closed early.

    `unreachable` when the server is proven not there: the connection was refused or
    reset (not when it answered badly or slowly)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes


class _Exchange(asyncio.BufferedProtocol):
    """One connection; parses one response at a time from a reusable receive buffer.

    A buffered protocol: the transport reads straight into our buffer (`recv_into`),
    which is kept between responses. A plain `Protocol` gets a fresh bytes object per
    read, which asyncio allocates at its 256 KiB maximum read size and then shrinks; at
    2,000 scrapes/s that allocation is a visible part of the cost.
    """

    def __init__(self, max_body_bytes: int) -> None:
        self._max_body = max_body_bytes
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray(_INITIAL_BUFFER_BYTES)
        self._filled = 0  # bytes of the current response in _buf
        self._waiter: asyncio.Future[HttpResponse] | None = None
        self._status = 0
        self._body_start = -1  # index of the body in the buffer once the head is parsed
        self._length = -1  # Content-Length; -1 unknown
        self._chunked = False
        self._chunk_pos = 0  # chunked: where the next chunk-size line starts
        self._chunks: list[bytes] = []
        self._chunked_size = 0
        self._until_close = False
        self.keep_alive = True
        self.closed = False
        self.received_any = False

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._until_close and self._body_start >= 0:
                body = bytes(memoryview(self._buf)[self._body_start : self._filled])
                waiter.set_result(HttpResponse(self._status, body))
            else:
                reason = f": {exc}" if exc else ""
                waiter.set_exception(
                    HttpError(
                        f"connection closed before a full answer{reason}",
                        unreachable=isinstance(exc, ConnectionResetError),
                    )
                )

    def get_buffer(self, sizehint: int) -> memoryview:
        free = len(self._buf) - self._filled
        if free < _MIN_READ_BYTES:
            # Grow for a big page; the limit checks in _parse end runaway answers.
            self._buf.extend(bytes(max(len(self._buf), _MIN_READ_BYTES)))
        return memoryview(self._buf)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for: the connection's framing can no longer be trusted.
            self.close()
            return
        self.received_any = True
        self._filled += nbytes
        try:
            response = self._parse()
        except HttpError as exc:
            self._waiter.set_exception(exc)
            self.close()
            return
        if response is not None:
            self._waiter.set_result(response)

    # -- requests -----------------------------------------------------------------------

    def send(self, head: bytes) -> asyncio.Future[HttpResponse]:
        assert self._transport is not None
        self._filled = 0
        self._status, self._body_start, self._length = 0, -1, -1
        self._chunked, self._chunk_pos, self._chunks, self._chunked_size = False, 0, [], 0
        self._until_close = False
        self.received_any = False
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(head)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # -- parsing (everything is bounded by self._filled: the buffer is reused) ----------

    def _parse(self) -> HttpResponse | None:
        buf, filled = self._buf, self._filled
        if self._body_start < 0:
            end = buf.find(b"\r\n\r\n", 0, filled)
            if end < 0:
                if filled > _MAX_HEAD_BYTES:
                    raise HttpError(f"response head longer than {_MAX_HEAD_BYTES} bytes")
                return None
            self._read_head(bytes(buf[:end]))
            self._body_start = self._chunk_pos = end + 4
        if self._chunked:
            return self._parse_chunks()
        if self._length >= 0:
            if filled - self._body_start < self._length:
                return None
            start = self._body_start
            return self._done(bytes(memoryview(buf)[start : start + self._length]))
        if filled - self._body_start > self._max_body:
            raise HttpError(f"body exceeds the {self._max_body}-byte limit")
        return None  # read until the server closes

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self._status = int(parts[1])
        http10 = parts[0] == b"HTTP/1.0"
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpError(f"malformed header line: {line[:80]!r}")
            key = name.strip().lower()
            if key == b"content-length":
                text = value.strip()
                if not text.isdigit():
                    raise HttpError(f"bad Content-Length: {text[:40]!r}")
                self._length = int(text)
                if self._length > self._max_body:
                    raise HttpError(
                        f"body of {self._length} bytes exceeds the {self._max_body}-byte limit"
                    )
            elif key == b"transfer-encoding":
                self._chunked = b"chunked" in value.lower()
            elif key == b"connection":
                connection = value.strip().lower()
        if self._chunked:
            self._length = -1  # RFC 9112: chunked framing wins over a Content-Length
        self.keep_alive = connection != b"close" and not (http10 and connection != b"keep-alive")
        if self._status in (204, 304) or 100 <= self._status < 200:
            self._length = 0
        elif not self._chunked and self._length < 0:
            self._until_close = True
            self.keep_alive = False

    def _parse_chunks(self) -> HttpResponse | None:
        buf, filled = self._buf, self._filled
        pos = self._chunk_pos
        while True:
            line_end = buf.find(b"\r\n", pos, filled)
            if line_end < 0:
                return None
            size_text = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(f"bad chunk size line: {size_text[:40]!r}") from None
            if size == 0:
                # Skip optional trailers up to the empty line that ends the message.
                end = buf.find(b"\r\n\r\n", line_end, filled)
                if end < 0:
                    return None
                self._chunk_pos = end + 4
                return self._done(b"".join(self._chunks))
            data_start = line_end + 2
            if filled < data_start + size + 2:
                return None
            self._chunked_size += size
            if self._chunked_size > self._max_body:
                raise HttpError(f"body exceeds the {self._max_body}-byte limit")
            self._chunks.append(bytes(memoryview(buf)[data_start : data_start + size]))
            if buf[data_start + size : data_start + size + 2] != b"\r\n":
                raise HttpError("chunk not followed by CRLF")
            pos = data_start + size + 2
            self._chunk_pos = pos

    def _done(self, body: bytes) -> HttpResponse:
        return HttpResponse(self._status, body)


class KeepAliveClient:
    """GETs with one pooled connection per target. Use from one event loop only."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._ssl = ssl_context
        self._max_body = max_body_bytes
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in extra_headers)
        self._idle: dict[tuple[str, int], _Exchange] = {}
        self._heads: dict[tuple[str, int, str], bytes] = {}
        self._closing = False

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def _head(self, host: str, port: int, path: str) -> bytes:
        key = (host, port, path)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) > 4096:
                self._heads.clear()
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            head = (
                f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n{self._extra}"
                "User-Agent: sluice-epp\r\n\r\n"
            ).encode("latin-1")
            self._heads[key] = head
        return head

    async def _connect(self, host: str, port: int) -> _Exchange:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                lambda: _Exchange(self._max_body),
                host,
                port,
                ssl=self._ssl,
                server_hostname=host if self._ssl is not None else None,
            )
        except OSError as exc:
            raise HttpError(
                f"cannot connect: {exc.strerror or exc}",
                unreachable=isinstance(exc, ConnectionRefusedError | ConnectionResetError)
                or exc.errno in _UNREACHABLE_ERRNOS,
            ) from exc
        return protocol

    async def get(self, host: str, port: int, path: str) -> HttpResponse:
        if self._closing:
            raise HttpError("client is closed")
        key = (host, port)
        head = self._head(host, port, path)
        conn = self._idle.pop(key, None)
        if conn is not None and conn.closed:
            conn = None
        reused = conn is not None
        if conn is None:
            conn = await self._connect(host, port)
        try:
            try:
                response = await conn.send(head)
            except HttpError:
                if not (reused and not conn.received_any):
                    raise
                # The server closed the idle connection as we reused it: retry once, fresh.
                conn.close()
                conn = await self._connect(host, port)
                response = await conn.send(head)
        except BaseException:
            conn.close()  # cancelled or failed mid-answer: its framing is lost
            raise
        if conn.keep_alive and not conn.closed and not self._closing and key not in self._idle:
            self._idle[key] = conn
        else:
            conn.close()
        return response

    def forget(self, host: str, port: int) -> None:
        """Close the kept-alive connection to a target that left the pool."""
        conn = self._idle.pop((host, port), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close idle connections now; busy ones close when their answer is in."""
        self._closing = True
        for conn in self._idle.values():
            conn.close()
        self._idle.clear()
