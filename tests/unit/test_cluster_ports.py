"""The local cluster launcher gives every node its own HTTP port, even when the same free port
comes up twice (it did: one node then failed to bind, and its requests went to the node that held
the port), and picks ports no bind to port 0 can take before the node binds them."""

from __future__ import annotations

import socket

import pytest

import p2psched.cluster as cluster_mod
import p2psched.redis_server as redis_server_mod
from p2psched.cluster import Cluster


class AcceptingOs:
    """``socket.socket`` as an OS where every port is free (the bind is only a probe)."""

    def __call__(self) -> AcceptingOs:
        return self

    def __enter__(self) -> AcceptingOs:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        pass


def test_nodes_get_distinct_ports_when_the_candidates_repeat(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(redis_server_mod.socket, "socket", AcceptingOs())
    monkeypatch.setattr(redis_server_mod, "_candidate_ports", lambda: iter([4999, 5000, 5000, 5000, 5001, 5001, 5002]))
    cluster = Cluster(3, ["--engine", "sim"], redis=cluster_mod.EmbeddedRedis(port=5000),  # Redis's is taken too
                      log_dir=str(tmp_path))
    assert [node.port for node in cluster.nodes] == [4999, 5001, 5002]
    assert not cluster.redis.is_running  # nothing was started


def test_free_ports_lie_outside_the_ephemeral_range_and_skip_ports_in_use() -> None:
    """A port from a bind to port 0 can be handed to another process's bind to port 0 before its
    server starts; ports outside the OS's ephemeral range never are."""
    low, high = redis_server_mod._ephemeral_range()
    taken: set[int] = set()
    ports = [redis_server_mod.free_port(taken=taken) for _ in range(50)]
    assert len(set(ports)) == 50 and taken == set(ports)
    assert not any(low <= port <= high for port in ports)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[0]))
        candidates = iter([ports[0], ports[1]])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(redis_server_mod, "_candidate_ports", lambda: candidates)
            assert redis_server_mod.free_port() == ports[1]  # the bound one is skipped
