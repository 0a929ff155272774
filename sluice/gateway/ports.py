"""Free TCP ports for tests and local demos.

`free_tcp_port` binds port 0, reads the port the kernel chose and closes the socket. The
port is free at that moment only: anything may take it before the caller binds it. Prefer
letting a server bind port 0 itself and asking it which port it got (`EnvoyProcess` does
that for Envoy; aiohttp and grpc servers report their bound ports too); use this only for
processes that cannot report their port back.
"""

from __future__ import annotations

import socket


def free_tcp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
