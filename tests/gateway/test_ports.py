import socket

import pytest

from sluice.gateway import ports

HOSTS = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]


def test_port_on_all_hosts_is_bindable_on_each() -> None:
    port = ports.free_tcp_port_on(HOSTS)
    sockets = []
    try:
        for host in HOSTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, port))
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_taken_on_one_host_is_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((HOSTS[1], 0))
        busy = taken.getsockname()[1]
        offers = iter([busy, busy, 0])
        real = ports.free_tcp_port

        def first_host_offer(host: str = "127.0.0.1") -> int:
            offer = next(offers)
            return offer or real(host)

        monkeypatch.setattr(ports, "free_tcp_port", first_host_offer)
        assert ports.free_tcp_port_on(HOSTS) != busy
