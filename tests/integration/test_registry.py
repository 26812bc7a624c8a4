"""The registry against a real redis-server: records, TTLs, shards, topics and the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import redis

from p2psched.core.config import SchedulerConfig
from p2psched.registry import NodeRecord, Registry


def record(node_id: str, pending: int = 0, model: str = "m") -> NodeRecord:
    return NodeRecord(node_id, f"name-{node_id}", 1, model, f"tcp://127.0.0.1:1/{node_id}",
                      f"tcp://127.0.0.1:2/{node_id}", "http://127.0.0.1:3", time.time(), pending=pending)


def config(server, **kw) -> SchedulerConfig:
    return SchedulerConfig(host=server.host, port=server.port, **kw)


def test_heartbeat_registers_lists_by_load_and_deregisters(redis_server):
    async def scenario():
        reg = Registry(config(redis_server, load_shards_num=4))
        for node_id, pending in (("a", 1), ("b", 7), ("c", 3)):
            await reg.heartbeat(record(node_id, pending))
        listed = await reg.nodes()
        assert [(r.node_id, r.pending) for r in listed] == [("b", 7), ("c", 3), ("a", 1)]
        assert listed[0].steal_endpoint == "tcp://127.0.0.1:1/b"
        await reg.deregister("b")
        assert [r.node_id for r in await reg.nodes()] == ["c", "a"]
        await reg.close()

    asyncio.run(scenario())
    raw = redis.Redis(port=redis_server.port)
    keys = sorted(k.decode() for k in raw.scan_iter("p2psched:*"))
    # Every key carries a {topic.shard} hash tag; records and their shard's index share it.
    assert all(k.startswith("p2psched:{default.") for k in keys), keys
    for key in keys:
        if ":node:" in key:
            tag = key[key.index("{"): key.index("}") + 1]
            assert f"p2psched:{tag}:load" in keys
            assert 0 < raw.pttl(key) <= 3000


def test_records_expire_without_heartbeat_and_are_pruned(redis_server):
    async def scenario():
        reg = Registry(config(redis_server, heartbeat_interval=0.1))
        await reg.heartbeat(record("gone", 5))
        assert [r.node_id for r in await reg.nodes()] == ["gone"]
        await asyncio.sleep(0.45)
        assert await reg.nodes() == []
        await reg.close()

    asyncio.run(scenario())
    raw = redis.Redis(port=redis_server.port)
    assert raw.zcard("p2psched:{default.0}:load") == 0


def test_members_reads_only_new_and_checked_records_and_prunes_the_expired(redis_server):
    """What a node runs every other heartbeat: its Redis work does not grow with the members it
    already knows (``INFO commandstats`` counts the commands)."""
    raw = redis.Redis(port=redis_server.port)

    def calls(command: str) -> int:
        return int(raw.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    async def scenario():
        reg = Registry(config(redis_server, heartbeat_interval=0.1))
        for node_id in "abc":
            await reg.heartbeat(record(node_id))
        known = await reg.members({})
        assert sorted(known) == ["a", "b", "c"] and known["b"].steal_endpoint == "tcp://127.0.0.1:1/b"
        before = calls("hgetall")
        again = await reg.members(known)
        assert again == known and calls("hgetall") == before  # nothing new: ids only
        await reg.heartbeat(record("d"))
        known = await reg.members(known, check=["a"])
        assert sorted(known) == ["a", "b", "c", "d"] and calls("hgetall") == before + 2  # d (new) and a (checked)
        await asyncio.sleep(0.45)  # every record expires; the index still lists them
        await reg.heartbeat(record("e"))
        known = await reg.members(known, check=["b"])
        assert sorted(known) == ["a", "c", "d", "e"]  # b, read again, is gone and pruned; the others unread
        assert raw.zscore("p2psched:{default.0}:load", "b") is None
        await reg.close()

    asyncio.run(scenario())


def test_topics_are_separate_namespaces(redis_server):
    async def scenario():
        red, blue = Registry(config(redis_server, topic="red")), Registry(config(redis_server, topic="blue"))
        await red.heartbeat(record("r1"))
        await blue.heartbeat(record("b1"))
        assert [r.node_id for r in await red.nodes()] == ["r1"]
        assert [r.node_id for r in await blue.nodes()] == ["b1"]
        await red.close()
        await blue.close()

    asyncio.run(scenario())


def test_cli_lists_nodes_as_json_and_table(redis_server):
    async def scenario():
        reg = Registry(config(redis_server))
        await reg.heartbeat(record("n1", 4))
        await reg.close()

    asyncio.run(scenario())
    base = [sys.executable, "-m", "p2psched.registry", "--scheduler-port", str(redis_server.port)]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=60, check=True)
    nodes = json.loads(out.stdout)
    assert [(n["node_id"], n["pending"], n["name"]) for n in nodes] == [("n1", 4, "name-n1")]
    table = subprocess.run(base, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "name-n1" in table and "tcp://127.0.0.1:1/n1" in table


def test_cli_reports_unreachable_redis_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "p2psched.registry", "--scheduler-port", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: cannot reach Redis") and len(proc.stderr.strip().splitlines()) == 1


def test_redis_errors_are_sorted_into_refusals_and_outages():
    """What needs an operator (a refused command) stops a node at start; Redis's own passing
    states (MISCONF when it cannot save, BUSY, OOM) do not."""
    import redis.exceptions as rex

    from p2psched.core.config import SchedulerConfig
    from p2psched.core.errors import ConfigError, RegistryUnavailable
    from p2psched.registry import access_error

    cfg = SchedulerConfig()
    refusals = [rex.NoPermissionError("NOPERM no permissions to run the 'zadd' command"),
                rex.ResponseError("Error running script (call to f_x): @user_script:2: NOPERM this user has no "
                                  "permissions to access one of the keys"),
                rex.ResponseError("Error running script (call to f_b): @user_script:1: @user_script: 1: The user "
                                  "executing the script can't run this command or subcommand"),  # Redis 6.2
                rex.ReadOnlyError("READONLY You can't write against a read only replica."),
                rex.AuthenticationError("WRONGPASS invalid username-password pair")]
    outages = [rex.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable"),
               rex.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
               rex.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'"),
               rex.ResponseError("BUSY Redis is busy running a script"), rex.ConnectionError("refused")]
    assert all(isinstance(access_error(e, cfg), ConfigError) for e in refusals)
    assert all(isinstance(access_error(e, cfg), RegistryUnavailable) for e in outages)
