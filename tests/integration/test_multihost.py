"""Nodes on separate hosts: network namespaces on one machine (``bench/netns.py``), Redis on a host
of its own, every link between hosts delayed by a TCP proxy, one host cut off and healed.

Each node starts with the default ``--host 0.0.0.0`` and no ``--advertise-host``: it must find
the address its peers reach it at by itself (the interface that routes to Redis). Runs as root
where ``ip netns`` works; skips with the reason elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.netns import (
    HTTP,
    RESULT_PROXY,
    STEAL_PROXY,
    LabCluster,
    NetLab,
    lab_cluster,
    unavailable,
)
from p2psched.cluster import NodeProcess
from p2psched.core.config import SchedulerConfig
from p2psched.redis_server import EmbeddedRedis
from p2psched.registry import NodeRecord, Registry

from .conftest import FAST
from .helpers import complete, expected_for, stream, wait_for

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces here: {WHY_NOT}")

HEARTBEAT = float(FAST[FAST.index("--heartbeat-interval") + 1])


def registered(redis: EmbeddedRedis, topic: str) -> dict[str, NodeRecord]:
    """The registry's records by node name, read straight from Redis (no proxy)."""
    async def read() -> list[NodeRecord]:
        registry = Registry(SchedulerConfig(host=redis.host, port=redis.port, topic=topic))
        try:
            return await registry.nodes()
        finally:
            await registry.close()

    return {record.name: record for record in asyncio.run(read())}


class Lab:
    def __init__(self, built: LabCluster, topic: str):
        self.net, self.redis, self.cluster, self.topic = built.lab, built.redis, built.cluster, topic

    def records(self) -> dict[str, NodeRecord]:
        return registered(self.redis, self.topic)


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[[float], Lab]]:
    """``lab_factory(rtt_ms)``: Redis and three nodes, each on its own host, every connection
    into a host delayed ``rtt_ms / 2`` each way (``bench.netns.lab_cluster``)."""
    with contextlib.ExitStack() as stack:
        def build(rtt_ms: float) -> Lab:
            topic = f"t{uuid.uuid4().hex[:8]}"
            built = stack.enter_context(lab_cluster(3, FAST, rtt_ms, str(tmp_path / "cluster0"), topic=topic))
            return Lab(built, topic)

        yield build


@pytest.mark.parametrize("rtt_ms", [1.0, 20.0])
def test_nodes_on_three_hosts_advertise_their_own_address_and_steal_across_hosts(lab_factory, rtt_ms):
    lab = lab_factory(rtt_ms)
    records = lab.records()
    assert sorted(records) == ["node0", "node1", "node2"]
    for i, node in enumerate(lab.cluster.nodes):
        address = lab.net.hosts[f"n{i}"].address
        record = records[node.name]
        assert record.steal_endpoint == f"tcp://{address}:{STEAL_PROXY}", record
        assert record.result_endpoint == f"tcp://{address}:{RESULT_PROXY}", record
        assert record.http_url == f"http://{address}:{HTTP}" and record.warning == ""

    origin = lab.cluster.nodes[0]
    lengths = {i: 10 + (i * 7) % 50 for i in range(48)}
    with ThreadPoolExecutor(len(lengths)) as pool:
        results = dict(zip(lengths, pool.map(lambda i: complete(origin.url, i, lengths[i]), lengths)))
    served_by = Counter(body["p2psched"]["served_by"] for body in results.values())
    for i, body in results.items():
        assert body["choices"][0]["token_ids"] == expected_for(i, lengths[i]), f"request {i}"
    assert served_by["node1"] > 0 and served_by["node2"] > 0, served_by  # both other hosts stole
    stats = {node.name: node.stats()["stats"] for node in lab.cluster.nodes}
    assert stats["node0"]["completed"] == len(lengths) and stats["node0"]["failed"] == 0
    assert stats["node0"]["stolen_out"] == stats["node1"]["stolen_in"] + stats["node2"]["stolen_in"]
    assert stats["node0"]["resumed"] == 0


def test_a_host_cut_off_mid_run_has_its_stolen_work_resumed_and_rejoins_after_the_heal(lab_factory):
    lab = lab_factory(10.0)
    origin, cut_node = lab.cluster.nodes[0], lab.cluster.nodes[1]
    n, max_tokens = 24, 150
    with ThreadPoolExecutor(n + 4) as pool:
        futures = {i: pool.submit(stream, origin.url, i, max_tokens) for i in range(n)}
        # Two requests whose origin is the host being cut off: its clients lose it too, so these
        # may fail; whatever they return must still be exact.
        own = {i: pool.submit(stream, cut_node.url, i, max_tokens, 30) for i in range(n, n + 2)}
        wait_for(lambda: cut_node.stats()["stats"]["token_items_forwarded"] > 0, timeout=30)
        lab.net.cut("n1")
        cut_at = time.monotonic()
        results = {i: f.result(timeout=120) for i, f in futures.items()}
        finished = time.monotonic() - cut_at
        lab.net.heal("n1")
        healed_at = time.monotonic()
        own_results = {}
        for i, f in own.items():
            try:
                own_results[i] = f.result(timeout=60)
            except (OSError, urllib.error.URLError, AssertionError):
                pass

    resumed = 0
    for i, (chunks, last) in results.items():
        tokens = [t for chunk in chunks for t in chunk]
        assert tokens == expected_for(i, max_tokens), f"request {i}: gap or duplicate in the stream"
        assert last["choices"][0]["finish_reason"] == "length"
        resumed += last["p2psched"]["attempts"] > 1
    for i, (chunks, _) in own_results.items():
        assert [t for chunk in chunks for t in chunk] == expected_for(i, max_tokens)[:sum(map(len, chunks))]
    stats = origin.stats()["stats"]
    assert resumed >= 1 and stats["resumed"] >= 1, (resumed, stats)
    assert stats["completed"] == n and stats["failed"] == 0
    print(f"origin finished its {n} requests {finished:.1f}s after the cut; {resumed} resumed")

    # After the heal the cut-off node registers again within a few heartbeats and steals again.
    wait_for(lambda: "node1" in lab.records(), timeout=10 * HEARTBEAT + 5)
    back_after = time.monotonic() - healed_at
    assert back_after <= 6 * HEARTBEAT + 2, f"re-registered {back_after:.1f}s after the heal"
    wait_for(lambda: "node1" in origin.stats()["peers"], timeout=10)
    before = cut_node.stats()["stats"]["stolen_in_completed"]
    lengths = {i: 20 + i % 30 for i in range(100, 140)}
    with ThreadPoolExecutor(len(lengths)) as pool:
        again = dict(zip(lengths, pool.map(lambda i: complete(origin.url, i, lengths[i]), lengths)))
    assert all(body["choices"][0]["token_ids"] == expected_for(i, lengths[i]) for i, body in again.items())
    assert cut_node.stats()["stats"]["stolen_in_completed"] > before
    assert origin.stats()["stats"]["failed"] == 0


def test_a_node_bound_to_loopback_warns_in_its_log_and_its_registry_record(tmp_path):
    """Redis on another host, the node on ``--host 127.0.0.1``: it still registers (so operators
    see it), and says loudly, in its log and its record, that no other host can reach it."""
    topic = f"t{uuid.uuid4().hex[:8]}"
    with NetLab(["redis", "n0"]) as net:
        redis_host = net.hosts["redis"]
        with EmbeddedRedis(port=6379, host=redis_host.address, launcher=redis_host.launcher) as redis:
            (tmp_path / "cluster0").mkdir()
            node = NodeProcess("loner", HTTP, ["--host", "127.0.0.1", "--node-name", "loner", "--scheduler-name",
                                               "global", "--scheduler-host", redis.host, "--scheduler-port", "6379",
                                               "--scheduler-topic", topic, *FAST],
                               tmp_path / "cluster0" / "loner.log", launcher=net.hosts["n0"].launcher)
            node.start()
            try:
                record = wait_for(lambda: registered(redis, topic).get("loner"), timeout=60, interval=0.2)
                assert record.steal_endpoint.startswith("tcp://127.0.0.1:")
                assert "loopback address 127.0.0.1 (from --host)" in record.warning
                assert redis.host in record.warning
                assert "*** this node advertises the loopback address" in node.log_text()
            finally:
                node.terminate(30)
