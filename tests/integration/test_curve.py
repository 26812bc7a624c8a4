"""CurveZMQ between nodes: keys from files, an allow-list directory, and refusals that prove it.

Real node processes, real sockets, real handshakes: peers with allowed keys steal and stream
exactly; a key that is not allowed gets no answer at all (the handshake is refused); an allowed
key that speaks for another node id is refused and counted; so is a plain-text client.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zmq
import zmq.auth

from p2psched import PROTOCOL_VERSION
from p2psched.core.protocol import Grant, Steal, decode, encode

from .helpers import complete, expected_for, register_fake_peer, wait_for


def make_keys(directory: Path, names: list[str], allowed: list[str]) -> Path:
    for name in names:
        zmq.auth.create_certificates(directory, name)
    allow = directory / "allow"
    allow.mkdir(exist_ok=True)
    for name in allowed:
        (allow / f"{name}.key").write_bytes((directory / f"{name}.key").read_bytes())
    return allow


def curve_args(directory: Path, name: str, allow: Path) -> list[str]:
    return ["--curve-key-file", str(directory / f"{name}.key_secret"), "--curve-allow-dir", str(allow)]


def test_nodes_with_allowed_keys_steal_and_stream_exactly(cluster_factory, tmp_path):
    allow = make_keys(tmp_path, ["node0", "node1"], ["node0", "node1"])
    cluster = cluster_factory(2, ["--sim-decode-step-ms", "10"],
                              per_node_args=[curve_args(tmp_path, f"node{i}", allow) for i in range(2)])
    origin, thief = cluster.nodes
    assert len(origin.stats()["public_key"]) == 40
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda i: complete(origin.url, i, 40), range(16)))
    for i, body in enumerate(bodies):
        assert body["choices"][0]["token_ids"] == expected_for(i, 40)
    assert origin.stats()["stats"]["stolen_out"] > 0
    assert thief.stats()["stats"]["stolen_in_completed"] == origin.stats()["stats"]["stolen_out"]


def _client(ctx: zmq.Context, endpoint: str, routing_id: str, keys: tuple[bytes, bytes] | None,
            server_key: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 1500)
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey = keys
        sock.curve_serverkey = server_key.encode()
    sock.connect(endpoint)
    return sock


def _ask(sock: zmq.Socket, thief_id: str, model_id: str, victim_id: str) -> Grant | None:
    sock.send(encode(Steal(PROTOCOL_VERSION, f"s-{time.monotonic_ns()}", victim_id, thief_id, "t", model_id, 1, 10_000, 4096)))
    try:
        reply = decode(sock.recv())
    except zmq.Again:
        return None
    assert isinstance(reply, Grant)
    return reply


def test_a_peer_whose_key_is_not_allowed_is_refused(cluster_factory, tmp_path):
    allow = make_keys(tmp_path, ["node0", "friend", "stranger"], ["node0", "friend"])
    cluster = cluster_factory(1, per_node_args=[curve_args(tmp_path, "node0", allow)])
    node = cluster.nodes[0]
    info = node.stats()
    keys = {name: zmq.auth.load_certificate(tmp_path / f"{name}.key_secret") for name in ("friend", "stranger")}
    for name, (public, _) in keys.items():  # both are registered; only one key is allowed
        register_fake_peer(cluster, f"{name}-id", info["model_id"], name=name, public_key=public.decode())
    wait_for(lambda: "friend" in node.stats()["peers"] and node.stats()["stats"]["bad_peer_records"] > 0,
             timeout=10)
    assert "stranger" not in node.stats()["peers"]  # a record whose key is not allowed is skipped
    ctx = zmq.Context()
    try:
        friend = _client(ctx, info["steal_endpoint"], "friend-id", keys["friend"], info["public_key"])
        assert _ask(friend, "friend-id", info["model_id"], info["node_id"]) is not None  # allowed: answered
        stranger = _client(ctx, info["steal_endpoint"], "stranger-id", keys["stranger"], info["public_key"])
        assert _ask(stranger, "stranger-id", info["model_id"], info["node_id"]) is None  # not allowed: the handshake fails
        plain = _client(ctx, info["steal_endpoint"], "friend-id-2", None, "")
        assert _ask(plain, "friend-id-2", info["model_id"], info["node_id"]) is None  # no CurveZMQ: no connection
        # An allowed key speaking for another registered node (the routing id matches the claim,
        # the key does not): refused and counted.
        impostor = _client(ctx, info["steal_endpoint"], "stranger-id", keys["friend"], info["public_key"])
        assert _ask(impostor, "stranger-id", info["model_id"], info["node_id"]) is None
        assert wait_for(lambda: node.stats()["stats"]["unauthorized"].get("steal", 0) == 1, timeout=5)
        # Revoking a key stops it on the connection it already has, at the next registry refresh.
        (allow / "friend.key").unlink()
        assert wait_for(lambda: _ask(friend, "friend-id", info["model_id"], info["node_id"]) is None, timeout=10)
        assert node.stats()["stats"]["unauthorized"]["steal"] >= 2
    finally:
        ctx.destroy(0)
    body = complete(node.url, 5, 8)
    assert body["choices"][0]["token_ids"] == expected_for(5, 8)


def test_keys_command_and_bad_key_files(tmp_path):
    run = [sys.executable, "-m", "p2psched.keys", str(tmp_path / "k"), "--name", "a"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "k" / "a.key").is_file()
    assert (tmp_path / "k" / "a.key_secret").stat().st_mode & 0o777 == 0o600
    again = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    for key_file, allow_dir, needle in ((tmp_path / "missing", tmp_path / "k", "--curve-key-file"),
                                        (tmp_path / "k" / "a.key", tmp_path / "k", "no secret key"),
                                        (tmp_path / "k" / "a.key_secret", tmp_path / "nope", "--curve-allow-dir")):
        node = subprocess.run([sys.executable, "-m", "p2psched.server", "--engine", "sim", "--port", "0",
                               "--curve-key-file", str(key_file), "--curve-allow-dir", str(allow_dir)],
                              capture_output=True, text=True, timeout=60)
        assert node.returncode == 2, node.stderr
        lines = node.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], node.stderr


def test_a_node_open_to_other_hosts_without_keys_warns_loudly(cluster_factory):
    cluster = cluster_factory(1, ["--host", "0.0.0.0"], scheduler_name="local")
    log = cluster.nodes[0].log_text()
    assert "0.0.0.0 is not a loopback address and CurveZMQ is off" in log
    quiet = cluster_factory(1, scheduler_name="local").nodes[0].log_text()  # loopback: no warning
    assert "CurveZMQ is off" not in quiet
