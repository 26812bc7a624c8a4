"""The local cluster launcher gives every node its own HTTP port, even when the OS hands the
same free port out twice (it did: one node then failed to bind, and its requests went to the
node that held the port)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import p2psched.cluster as cluster_mod
import p2psched.redis_server as redis_server_mod
from p2psched.cluster import Cluster


class RepeatingOs:
    """``socket.socket`` as an OS that hands the ports of ``ports`` out, in turn, to binds to port 0."""

    def __init__(self, ports: Iterator[int]):
        self._ports = ports

    def __call__(self) -> RepeatingOs:
        return self

    def __enter__(self) -> RepeatingOs:
        self._port = next(self._ports)
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        assert address[1] == 0

    def getsockname(self) -> tuple[str, int]:
        return "127.0.0.1", self._port


def test_nodes_get_distinct_ports_when_free_port_repeats_itself(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(redis_server_mod.socket, "socket", RepeatingOs(iter([4999, 5000, 5000, 5000, 5001, 5001, 5002])))
    cluster = Cluster(3, ["--engine", "sim"], redis=cluster_mod.EmbeddedRedis(port=5000),  # Redis's is taken too
                      log_dir=str(tmp_path))
    assert [node.port for node in cluster.nodes] == [4999, 5001, 5002]
    assert not cluster.redis.is_running  # nothing was started
