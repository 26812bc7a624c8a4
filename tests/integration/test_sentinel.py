"""The registry behind Redis Sentinel: one master, one replica and three sentinels, real
processes from the same redis-server binary; nodes and the CLI find the master through the
sentinels and follow it when it fails over."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from p2psched.core.config import SchedulerConfig
from p2psched.core.errors import ConfigError
from p2psched.redis_server import EmbeddedSentinels, free_port
from p2psched.registry import Keys, NodeRecord, Registry, verify_access

from .conftest import FAST
from .helpers import complete, expected_for, wait_for

HEARTBEAT_S = float(FAST[FAST.index("--heartbeat-interval") + 1])


@pytest.fixture
def sentinels() -> Iterator[EmbeddedSentinels]:
    with EmbeddedSentinels() as group:
        yield group


def record(node_id: str, pending: int = 0) -> NodeRecord:
    return NodeRecord(node_id, f"name-{node_id}", 1, "m", f"tcp://127.0.0.1:1/{node_id}",
                      f"tcp://127.0.0.1:2/{node_id}", "http://127.0.0.1:3", time.time(), pending=pending)


def through(group: EmbeddedSentinels, **kw: Any) -> SchedulerConfig:
    return SchedulerConfig(sentinels=group.sentinels_flag, sentinel_master=group.master_name, **kw)


def registry_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2psched.registry", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def stolen_in(cluster: Any) -> int:
    return sum(node.stats()["stats"]["stolen_in"] for node in cluster.nodes)


def test_the_registry_and_its_cli_work_through_the_sentinels(sentinels):
    """Every command a node sends, through the sentinels, lands in the master; the CLI lists the
    nodes from there; a wrong master name or an address that is no sentinel is a one-line error."""
    cfg = through(sentinels, load_shards_num=2)

    async def scenario() -> None:
        await verify_access(cfg)
        reg = Registry(cfg)
        for node_id, pending in (("a", 1), ("b", 7)):
            await reg.heartbeat(record(node_id, pending))
        assert [("b", 7), ("a", 1)] == [(r.node_id, r.pending) for r in await reg.nodes()]
        assert ["a", "b"] == sorted(await reg.members({}))
        await reg.deregister("a")
        assert ["b"] == [r.node_id for r in await reg.nodes()]
        await reg.close()

    asyncio.run(scenario())
    master, keys = redis.Redis(port=sentinels.master.port), Keys("default", 2)
    assert 7 == master.zscore(keys.load(keys.shard_of("b")), "b") and master.exists(keys.node("b"))
    assert not master.exists(keys.node("a"))

    listed = registry_cli("--scheduler-sentinels", sentinels.sentinels_flag, "--shards", "2", "--json")
    assert 0 == listed.returncode, listed.stderr
    assert [("b", 7, "name-b")] == [(n["node_id"], n["pending"], n["name"]) for n in json.loads(listed.stdout)]
    table = registry_cli("--scheduler-sentinels", sentinels.sentinels_flag, "--shards", "2").stdout
    assert "name-b" in table and "tcp://127.0.0.1:1/b" in table

    wrong_name = registry_cli("--scheduler-sentinels", sentinels.sentinels_flag, "--scheduler-sentinel-master", "nope")
    assert 2 == wrong_name.returncode and 1 == len(wrong_name.stderr.strip().splitlines())
    assert f"the sentinels {sentinels.sentinels_flag} monitor no master named 'nope' (they monitor: mymaster)" \
        in wrong_name.stderr
    not_a_sentinel = f"127.0.0.1:{sentinels.master.port}"
    with pytest.raises(ConfigError, match=f"--scheduler-sentinels {not_a_sentinel} is a Redis, not a sentinel"):
        asyncio.run(verify_access(SchedulerConfig(sentinels=not_a_sentinel)))
    down = registry_cli("--scheduler-sentinels", f"127.0.0.1:{free_port()}")
    assert 1 == down.returncode and 1 == len(down.stderr.strip().splitlines())
    assert down.stderr.startswith("error: cannot reach Redis master 'mymaster' of the sentinels 127.0.0.1:")


def test_a_manual_failover_a_lost_script_and_a_demoted_master_are_ridden_out(sentinels):
    """``SENTINEL FAILOVER`` leaves the old master up, still a master until the sentinels demote
    it seconds later: the next heartbeat asks the sentinels and goes to the new master anyway.
    It loads the heartbeat script again where it is missing; and a connection that reaches the
    demoted master (READONLY inside the script, which redis-py's Sentinel client does not
    notice) is an outage, dropped so that the next heartbeat asks the sentinels again."""
    cfg = through(sentinels, heartbeat_interval=0.3)
    old = sentinels.master_address()
    assert old is not None
    node_key = Keys("default", 1).node("a")

    async def scenario() -> None:
        reg = Registry(cfg)
        await reg.heartbeat(record("a"))
        assert sentinels.sentinel_client(0).execute_command("SENTINEL", "FAILOVER", sentinels.master_name)
        new = sentinels.wait_for_failover(old)
        promoted = redis.Redis(host=new[0], port=new[1])
        promoted.delete(node_key)  # replicated before the failover: not what this test looks for
        await reg.heartbeat(record("a", pending=2))  # the first heartbeat after the promotion
        assert b"2" == promoted.hget(node_key, "pending")

        promoted.script_flush()  # EVALSHA meets NOSCRIPT: the script is loaded again
        await reg.heartbeat(record("a", pending=3))
        assert b"3" == promoted.hget(node_key, "pending")

        # The old master is demoted (as the sentinels do, seconds later), and a sentinel that has
        # not heard of the failover names it.
        demoted = redis.Redis(host=old[0], port=old[1])
        demoted.replicaof(*new)
        wait_for(lambda: demoted.info("replication")["role"] == "slave", timeout=10)
        manager = reg._client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
        real_discover = manager.discover_master
        stale = [old, old]  # asked before the heartbeat, and again by the new connection

        async def discover(name: str) -> tuple[str, int]:
            return stale.pop() if stale else await real_discover(name)

        manager.discover_master = discover
        await reg._client.connection_pool.disconnect()
        with pytest.raises(Exception, match="was demoted by a failover|READONLY"):
            await reg.heartbeat(record("a", pending=4))
        await reg.heartbeat(record("a", pending=5))  # a new connection: the sentinels name the new master
        assert b"5" == promoted.hget(Keys("default", 1).node("a"), "pending")
        await reg.close()

    asyncio.run(scenario())


def test_sentinels_that_want_a_login_stop_a_node_at_start():
    """p2psched sends sentinels no password: a sentinel with requirepass is a configuration to fix,
    said in one line, not an outage to wait out."""
    with EmbeddedSentinels(num_sentinels=1, quorum=1, sentinel_password="s3cret") as group, \
            pytest.raises(ConfigError, match=r"sentinel 127\.0\.0\.1:\d+ wants a login, and p2psched sends sentinels none"):
        asyncio.run(verify_access(through(group)))


def test_a_node_whose_sentinels_are_unreachable_starts_and_serves_alone(cluster_factory):
    cluster = cluster_factory(1, ["--scheduler-sentinels", f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"])
    node = cluster.nodes[0]
    body = complete(node.url, 0, 12)
    assert expected_for(0, 12) == body["choices"][0]["token_ids"]
    stats = node.stats()
    assert stats["registry_stale"] and stats["stats"]["registry_errors"] >= 1
    assert "no sentinel of 127.0.0.1:" in node.log_text()


def test_nodes_follow_a_failover_under_load_lose_nothing_and_reregister_within_a_few_heartbeats(
        cluster_factory, sentinels):
    """Three nodes register through the sentinels; clients keep ten requests in flight (eight at
    node0, which the others steal from). The master is SIGKILLed: the sentinels promote the
    replica, every node writes its record to the new master within five heartbeats of the
    promotion (records written before the kill may have been replicated, so only a record
    stamped after the kill counts), every request is answered in full, and steals go on."""
    cluster = cluster_factory(3, sentinels.node_args, redis=sentinels.master)
    node_ids = {node.stats()["node_id"]: node.name for node in cluster.nodes}
    targets = [cluster.nodes[0].url] * 8 + [cluster.nodes[1].url, cluster.nodes[2].url]
    results: dict[int, tuple[int, dict[str, Any]]] = {}
    errors: list[str] = []
    stop = threading.Event()

    def client(worker: int) -> None:
        i = worker
        while not stop.is_set():
            max_tokens = 30 + i % 40
            try:
                results[i] = (max_tokens, complete(targets[worker], i, max_tokens))
            except Exception as exc:  # noqa: BLE001 - counted as lost, reported below
                errors.append(f"request {i}: {exc!r}")
            i += len(targets)

    workers = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(len(targets))]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: stolen_in(cluster) > 0, timeout=30)
        old = sentinels.master_address()
        assert old is not None
        sentinels.kill_master()
        killed_wall, killed = time.time(), time.monotonic()
        new = sentinels.wait_for_failover(old, timeout=30)
        promoted = time.monotonic()
        steals_at_promotion = stolen_in(cluster)

        keys = Keys(cluster.topic, 1)
        new_master = redis.Redis(host=new[0], port=new[1], socket_timeout=1)

        def written_since_kill() -> set[str]:
            return {node_id for node_id in node_ids
                    if float(new_master.hget(keys.node(node_id), "updated_at") or 0) > killed_wall}

        wait_for(lambda: written_since_kill() == set(node_ids), timeout=10, interval=0.01)
        reregistered = time.monotonic()
        wait_for(lambda: not any(node.stats()["registry_stale"] for node in cluster.nodes), timeout=10)
        wait_for(lambda: stolen_in(cluster) > steals_at_promotion, timeout=30)
        wait_for(lambda: all(len(node.stats()["peers"]) == 2 for node in cluster.nodes), timeout=10)

        listed = registry_cli("--scheduler-sentinels", sentinels.sentinels_flag, "--scheduler-topic",
                              cluster.topic, "--json")
        assert 0 == listed.returncode, listed.stderr
        assert set(node_ids) == {n["node_id"] for n in json.loads(listed.stdout)}
        answered = len(results)
        wait_for(lambda: len(results) >= answered + 10, timeout=30)  # load goes on a little on the new master
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)

    print(f"\nfailover: kill -> promotion {promoted - killed:.2f} s; promotion -> all {len(node_ids)} nodes "
          f"re-registered {reregistered - promoted:.2f} s ({(reregistered - promoted) / HEARTBEAT_S:.1f} "
          f"heartbeats); {len(results)} requests, {stolen_in(cluster)} stolen ({steals_at_promotion} before "
          f"the promotion)")
    assert [] == errors
    assert reregistered - promoted <= 5 * HEARTBEAT_S, sentinels.log_text()[-3000:]
    for i, (max_tokens, body) in results.items():
        assert expected_for(i, max_tokens) == body["choices"][0]["token_ids"], f"request {i}"
        assert "length" == body["choices"][0]["finish_reason"]
    stats = [node.stats()["stats"] for node in cluster.nodes]
    assert len(results) == sum(s["completed"] for s in stats)
    assert [0, 0, 0] == [s["failed"] for s in stats]
    assert sum(s["registry_errors"] for s in stats) > 0  # the nodes did see the outage
