"""The local cluster launcher gives every node its own HTTP port, even when the OS hands the
same free port out twice (it did: one node then failed to bind, and its requests went to the
node that held the port)."""

from __future__ import annotations

import pytest

import p2psched.cluster as cluster_mod
from p2psched.cluster import Cluster


def test_nodes_get_distinct_ports_when_free_port_repeats_itself(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    ports = iter([4999, 5000, 5000, 5000, 5001, 5001, 5002])
    monkeypatch.setattr(cluster_mod, "free_port", lambda: next(ports))
    cluster = Cluster(3, ["--engine", "sim"], redis=cluster_mod.EmbeddedRedis(port=5000),  # Redis's is taken too
                      log_dir=str(tmp_path))
    assert [node.port for node in cluster.nodes] == [4999, 5001, 5002]
    assert not cluster.redis.is_running  # nothing was started
