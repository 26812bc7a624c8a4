"""The chaos suite's TCP proxy (bench/tcp_proxy.py) over real loopback sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bench.tcp_proxy import ProxyThread
from p2psched.redis_server import free_port


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A threaded echo server on loopback."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    is_running = True

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while is_running:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield int(server.getsockname()[1])
    is_running = False
    acceptor.join(1)
    server.close()


@pytest.fixture
def proxy(echo_port: int) -> Iterator[tuple[ProxyThread, int]]:
    listen = free_port()
    with ProxyThread() as proxies:
        proxies.add("echo", listen, echo_port)
        yield proxies, listen


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=3)


def test_forwards_bytes_both_ways_in_order(proxy: tuple[ProxyThread, int]) -> None:
    proxies, port = proxy
    payload = bytes(range(256)) * 2000  # 512 KB: many chunks
    with connect(port) as sock:
        assert round_trip(sock, payload) == payload
        assert round_trip(sock, b"again") == b"again"
    counters = proxies.counters("echo")
    assert counters.accepted == 1 and counters.bytes_forwarded >= 2 * len(payload)


def test_delay_holds_each_direction(proxy: tuple[ProxyThread, int]) -> None:
    proxies, port = proxy
    with connect(port) as sock:
        start = time.monotonic()
        round_trip(sock, b"ping")
        fast = time.monotonic() - start
        proxies.set_delay("echo", 150)
        start = time.monotonic()
        assert round_trip(sock, b"ping") == b"ping"
        slow = time.monotonic() - start
        proxies.set_delay("echo", 0)
        start = time.monotonic()
        round_trip(sock, b"ping")
        healed = time.monotonic() - start
    assert slow >= 0.3  # held 150 ms on the way in and 150 ms on the way back
    assert fast < 0.15 and healed < 0.15


def test_cut_resets_open_connections_and_refuses_new_ones_until_it_ends(proxy: tuple[ProxyThread, int]) -> None:
    proxies, port = proxy
    with connect(port) as sock:
        assert round_trip(sock, b"before") == b"before"
        proxies.cut("echo", 0.6)
        sock.settimeout(2)
        assert _is_closed(sock)
    with connect(port) as refused:  # the handshake completes (the proxy listens), then a reset
        refused.settimeout(2)
        assert _is_closed(refused)
    time.sleep(0.7)
    with connect(port) as sock:
        assert round_trip(sock, b"after") == b"after"
    counters = proxies.counters("echo")
    assert counters.cut == 1 and counters.refused >= 1


def test_heal_ends_a_cut_early(proxy: tuple[ProxyThread, int]) -> None:
    proxies, port = proxy
    proxies.cut("echo", 60)
    with connect(port) as refused:
        refused.settimeout(2)
        assert _is_closed(refused)
    proxies.heal("echo")
    with connect(port) as sock:
        assert round_trip(sock, b"healed") == b"healed"


def _is_closed(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"x")
        return sock.recv(1) == b""
    except OSError:  # reset by peer
        return True

