"""A raw asyncio HTTP/1.1 server whose framing the test controls byte by byte.

aiohttp's test servers always frame answers correctly; the scrape client must also cope
with answers split anywhere, chunked bodies with extensions and trailers, bodies that end
at connection close, `Connection: close`, and servers that drop idle connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

# Builds the raw answer for the n-th request (1-based) on the server.
Answer = Callable[[int], bytes]


def content_length(body: bytes, status: int = 200, extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def chunked(body: bytes, size: int = 7, trailer: str = "") -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for i in range(0, len(body), size):
        part = body[i : i + size]
        out += f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n" + trailer.encode() + b"\r\n"


@dataclass
class RawServer:
    answer: Answer
    split_bytes: int = 0  # >0: write answers in pieces of this size, yielding in between
    close_after_answer: bool = False
    hang: bool = False
    requests: int = 0
    connections: int = 0
    request_heads: list[bytes] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()
            self._server = None

    def drop_connections(self) -> None:
        """Close every open connection, as a server does with idle keep-alive ones."""
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                self.request_heads.append(head)
                if self.hang:
                    await asyncio.Event().wait()
                data = self.answer(self.requests)
                if self.split_bytes:
                    for i in range(0, len(data), self.split_bytes):
                        writer.write(data[i : i + self.split_bytes])
                        await writer.drain()
                        await asyncio.sleep(0)
                else:
                    writer.write(data)
                    await writer.drain()
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
