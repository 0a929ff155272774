"""Free TCP ports for tests and local demos.

`free_tcp_port` binds port 0, reads the port the kernel chose and closes the socket. The
port is free at that moment only: anything may take it before the caller binds it. Prefer
letting a server bind port 0 itself and asking it which port it got (`EnvoyProcess` does
that for Envoy; aiohttp and grpc servers report their bound ports too); use this only for
processes that cannot report their port back.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence


def free_tcp_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_tcp_port_on(hosts: Sequence[str]) -> int:
    """A port free on every one of `hosts` right now: servers on loopback addresses of
    their own (as pods have) then bind the same port, each on its own address."""
    for _ in range(50):
        port = free_tcp_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {', '.join(hosts)}")
