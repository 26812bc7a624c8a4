"""The bench's FastDeploy baseline (``bench/balance/fastdeploy.py``) against a real Redis: what it
does with requests (queued in Redis lists, stolen from the front of the least loaded peer's list
at most two at a time, results relayed through the origin's response list) and what it does not
(a node blocked on its own list is deaf to a peer's queue for the whole 2 s)."""

import asyncio
import json
import random

import pytest

from bench.balance.fastdeploy import BLPOP_REQUEST_TIMEOUT_S, Chunk, FdConfig, FdScheduler
from p2psched.redis_server import EmbeddedRedis


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


async def _engine(raw):
    for _ in range(raw["max_tokens"] - 1):
        await asyncio.sleep(0.002)
        yield Chunk(1)
    yield Chunk(1, finished=True)


def _scheduler(name, url, topic, seed=0, slots=8):
    return FdScheduler(name, url, FdConfig(topic=topic, max_num_seqs=slots), _engine, random.Random(seed))


async def _queue(scheduler, count):
    """``count`` requests put on ``scheduler`` (its put worker not running: written here)."""
    for i in range(count):
        await scheduler.put_request(f"r{i}", {"prompt": f"p{i}", "max_tokens": 3}, lambda event: None)
    raws = [scheduler._puts.get_nowait()[1] for _ in range(count)]
    await scheduler._rpush(scheduler.req_queue(), raws)
    await scheduler._incr(scheduler.load_table(), count, scheduler.name)


def test_a_thief_takes_at_most_two_from_the_front_of_a_qualifying_peer(redis_url):
    async def run():
        victim, thief = _scheduler("v", redis_url, "t1"), _scheduler("t", redis_url, "t1")
        await _queue(victim, 5)
        taken = await thief.get_requests(3)  # three free slots: half of them (two) per steal
        assert [r["request_id"] for r in taken] == ["r0", "r1"]
        assert all(r["response_queue_name"] == victim.resp_queue() for r in taken)
        assert await victim.client.llen(victim.req_queue()) == 3
        assert await victim.client.zscore(victim.load_table(), "v") == 3
        assert thief.stolen == 2
        for s in (victim, thief):
            await s.close()

    asyncio.run(run())


def test_a_node_blocked_on_its_own_list_does_not_see_a_peer_queue_for_two_seconds(redis_url):
    async def run():
        idle, busy = _scheduler("idle", redis_url, "t2"), _scheduler("busy", redis_url, "t2")
        loop = asyncio.get_running_loop()
        started = loop.time()
        get = asyncio.create_task(idle.get_requests(1))  # nobody queued: it blocks on its own list only
        while not any(c["cmd"] == "blpop" for c in await busy.client.client_list()):
            await asyncio.sleep(0.01)
        await _queue(busy, 2)  # a peer queues while it is blocked
        assert await get == []  # the BLPOP ran out without it
        assert loop.time() - started >= BLPOP_REQUEST_TIMEOUT_S - 0.05
        assert await busy.client.llen(busy.req_queue()) == 2
        taken = await idle.get_requests(1)  # the next turn reads the load set and steals
        assert [r["request_id"] for r in taken] == ["r0"]
        for s in (idle, busy):
            await s.close()

    asyncio.run(run())


def test_stolen_results_reach_the_origin_through_redis_and_every_request_completes(redis_url):
    async def run():
        a = _scheduler("a", redis_url, "t3", seed=1, slots=2)
        b = _scheduler("b", redis_url, "t3", seed=2, slots=8)
        events: dict[str, list] = {}
        done = {f"q{i}": asyncio.Event() for i in range(12)}

        def sink_for(rid):
            def sink(event):
                events.setdefault(rid, []).append(event)
                if event["done"]:
                    done[rid].set()
            return sink

        for rid in done:  # all to a (2 slots), queued before anyone looks; b starts first and steals
            await a.put_request(rid, {"prompt": rid, "max_tokens": 20}, sink_for(rid))
        raws = [a._puts.get_nowait()[1] for _ in done]
        await a._rpush(a.req_queue(), raws)
        await a._incr(a.load_table(), len(raws), a.name)
        await b.start()
        for _ in range(200):
            if b.stolen:
                break
            await asyncio.sleep(0.01)
        await a.start()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), 30)
        served = {rid: evs[-1]["by"] for rid, evs in events.items()}
        for rid, evs in events.items():
            assert sum(e["n"] for e in evs) == 20 and not any(e["error"] for e in evs), rid
        assert set(served.values()) == {"a", "b"} and b.stolen > 0
        resp = await a.client.llen(a.resp_queue())
        assert resp == 0  # the origin drained what b relayed
        info = await a.client.info("commandstats")
        assert info["cmdstat_rpush"]["calls"] > 12  # the puts and the relayed results
        for s in (a, b):
            await s.close()

    asyncio.run(run())


def test_requests_the_engine_cannot_take_go_back_to_the_front_of_their_list(redis_url):
    async def run():
        victim = _scheduler("v", redis_url, "t4")
        thief = FdScheduler("t", redis_url, FdConfig(topic="t4", max_num_batched_tokens=2), _engine, random.Random(0))
        await _queue(victim, 3)
        taken = await thief.get_requests(3)  # pops two; the second's prompt tokens exceed the batch budget
        assert [r["request_id"] for r in taken] == ["r0"]
        left = [json.loads(raw)["request_id"] for raw in await victim.client.lrange(victim.req_queue(), 0, -1)]
        assert left == ["r1", "r2"]
        assert await victim.client.zscore(victim.load_table(), "v") == 2
        for s in (victim, thief):
            await s.close()

    asyncio.run(run())
