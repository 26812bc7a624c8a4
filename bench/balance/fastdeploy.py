"""FastDeploy's Redis "global scheduler", rebuilt as the balance bench's baseline.

What p2psched replaces (../shared/DESIGN.md §7), written from its published behaviour so the
bench can run it beside ``global`` on the same nodes, engine and workload. Per node, one
``FdScheduler`` does what FastDeploy's ``GlobalScheduler`` does inside each instance:

- **Put**: every request, local or not, goes through Redis: one worker batches arrivals (up to 20)
  into one ``RPUSH`` of JSON (prompt, prompt token ids, sampling) onto the node's request list,
  plus a ``ZINCRBY`` of its queued count in the load sorted set, each with ``EXPIRE`` in a
  ``MULTI`` (FastDeploy's ``AdaptedRedis``); the count is decremented through a Lua script that
  removes a member whose count reaches zero.
- **Get**, called by the engine's insert loop only while the engine has a free slot, for
  ``min(free slots, max_prefill_batch = 3)`` requests: pop its own list (two ``LPOP``s of half
  the batch each); if that gave nothing, read the first 50 members of the load set with at
  least ``min_load_score`` queued (so the *least* loaded of those qualifying), sample 10, drop
  itself, pick one at random and ``LPOP`` half the batch from the front of its list (at most two
  requests per steal); if still nothing, ``BLPOP`` its own list and those sampled peers' lists
  for up to 2 s, deaf to any other peer's queue meanwhile. Requests the engine cannot take
  (here: the prompt-token budget of one prefill batch) are pushed back with ``LPUSH``, which
  reverses their order. An empty get sleeps 1 ms and asks again.
- **Results**: a local request's tokens go to its client in memory; a stolen one's are batched by
  one worker (up to 300) into one ``RPUSH`` per origin's response list; each origin drains its
  response list with ``LPOP 300``, or ``BLPOP`` for up to 10 s when it is empty.
- **Membership**: a name key ``SET NX EX 30`` at start, refreshed every 15 s; a thief that finds a
  sampled peer's list empty and its name key gone removes it from the load set.

No lease, ack, retry or cancel: a thief that dies loses what it popped (as in FastDeploy).

Not modelled: the KV-block check (the bench's nodes never run short of KV), chunked-prefill
limits, FastDeploy's API-server-to-engine hops (the request goes from this scheduler to its
node over one local HTTP stream, as the bench's ``oracle`` does), and the 1 ms polling of a full
engine (a freed slot wakes the insert loop at once, which only helps FastDeploy). Requests reach
the node that runs them with stealing off, so the node's own queue stays empty: every placement
decision is this scheduler's.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

log = logging.getLogger("bench.fastdeploy")

MAX_PREFILL_BATCH = 3
BLPOP_REQUEST_TIMEOUT_S = 2.0
BLPOP_RESPONSE_TIMEOUT_S = 10.0
LOAD_COUNT = 50  # members read from the load set per lookup
LOAD_LOOKUP_NUM = 5  # shards tried per lookup
SAMPLE = 10  # candidate victims sampled from those read
KEEP_ALIVE_S = 30.0
PUT_BATCH = 20
RESULT_BATCH = 300
EMPTY_GET_SLEEP_S = 0.001

# ZINCRBY, then remove the member if its score reached ARGV[3] (FastDeploy's rem_amount; "NIL": never)
_ZINCRBY_REM = """
local score = tonumber(redis.call('ZINCRBY', KEYS[1], ARGV[1], ARGV[2])) or 0
if ARGV[3] ~= 'NIL' and score == tonumber(ARGV[3]) then
  redis.call('ZREM', KEYS[1], ARGV[2])
  score = 0
end
return tostring(score)
"""


@dataclass(frozen=True)
class Chunk:
    """What the engine streamed for one request since its last chunk."""
    tokens: int
    finished: bool = False
    error: str | None = None


Event = dict[str, Any]  # {"id", "n", "done", "by", "error"}: one result, as relayed
Engine = Callable[[dict[str, Any]], AsyncIterator[Chunk]]


@dataclass(frozen=True)
class FdConfig:
    topic: str = "fd"
    ttl_s: int = 900
    min_load_score: float = 1.0
    load_shards_num: int = 1
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 8192


class FdScheduler:
    """One node's FastDeploy global scheduler in front of its engine (``engine``: runs one
    request, yielding its chunks)."""

    def __init__(self, name: str, redis_url: str, config: FdConfig, engine: Engine, rng: random.Random):
        self.name = name
        self.cfg = config
        self.engine = engine
        self.rng = rng
        # FastDeploy: one pool of at most 10 connections per instance (a BLPOP holds one); no read
        # timeout (sync redis-py's default; the asyncio client's 5 s would cut its 10 s BLPOP)
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=10, socket_timeout=None)
        self.client = aioredis.Redis(connection_pool=pool)
        self._zincrby = self.client.register_script(_ZINCRBY_REM)
        self.shard = 0
        self._lookup_slot = 0
        self._local: dict[str, Callable[[Event], None]] = {}  # request id -> its client's sink
        self._puts: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._relay: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._in_flight = 0
        self._freed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: set[asyncio.Task[None]] = set()
        self._is_leaving = False
        self.stolen = 0  # requests this node took from a peer's list
        self.errors = 0  # worker errors (logged; the worker goes on)

    # -- keys
    def _ins(self, name: str) -> str:
        return f"{self.cfg.topic}.ins.{name}"

    def req_queue(self, name: str | None = None) -> str:
        return f"{self.cfg.topic}.req.{name or self.name}"

    def resp_queue(self, name: str | None = None) -> str:
        return f"{self.cfg.topic}.resp.{name or self.name}"

    def load_table(self, shard: int | None = None) -> str:
        return f"{self.cfg.topic}.load.{self.shard if shard is None else shard}"

    def _name_of(self, req_queue: str) -> str:
        return req_queue[len(f"{self.cfg.topic}.req."):]

    # -- AdaptedRedis: each write with its EXPIRE in one MULTI
    async def _rpush(self, key: str, values: list[bytes]) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *values)
            pipe.expire(key, self.cfg.ttl_s)
            await pipe.execute()

    async def _lpop(self, key: str, count: int) -> list[bytes]:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.lpop(key, count)
            pipe.expire(key, self.cfg.ttl_s)
            popped = (await pipe.execute())[0]
        return list(popped or [])

    async def _incr(self, table: str, amount: int, member: str, remove_at_zero: bool = True) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            if remove_at_zero:
                await self._zincrby(keys=[table], args=[str(amount), member, "0"], client=pipe)
            else:
                pipe.zincrby(table, amount, member)
            pipe.expire(table, self.cfg.ttl_s)
            await pipe.execute()

    # -- life
    async def start(self) -> None:
        name, count = self.name, 1
        while not await self.client.set(self._ins(name), "", ex=int(KEEP_ALIVE_S), nx=True):
            name, count = f"{self.name}:{count}", count + 1
        self.name = name
        # FastDeploy's shard: CRC16-CCITT (init 0xFFFF) of the name; Python's hash() differs per process
        self.shard = binascii.crc_hqx(name.encode(), 0xFFFF) % self.cfg.load_shards_num
        await self.client.set(self._ins(name), self.load_table(), ex=int(KEEP_ALIVE_S))
        for loop in (self._keep_alive, self._put_worker, self._insert_loop, self._relay_worker, self._results_worker):
            self._tasks.append(asyncio.create_task(self._forever(loop), name=f"fd-{loop.__name__}-{name}"))

    async def _forever(self, loop: Callable[[], Awaitable[None]]) -> None:
        """As FastDeploy's worker threads: an error is logged and the worker goes on (the insert
        loop, until the instance leaves)."""
        while not (self._is_leaving and loop == self._insert_loop):
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("%s: %s failed; restarting it", self.name, getattr(loop, "__name__", loop))
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        for task in [*self._tasks, *self._serving]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._serving, return_exceptions=True)
        await self.client.aclose()
        await self.client.connection_pool.disconnect()

    async def leave(self) -> None:
        """Take no more requests (the instance is leaving): the insert loop ends after its turn
        (what that turn took is served), what it runs finishes, stolen results still come home,
        and what is left in its list waits there for its peers to take."""
        self._is_leaving = True
        self._freed.set()  # a loop waiting for a free slot looks again, and ends
        await asyncio.gather(*(t for t in self._tasks if t.get_name().startswith("fd-_insert_loop")),
                             return_exceptions=True)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(KEEP_ALIVE_S / 2)
            await self.client.set(self._ins(self.name), self.load_table(), ex=int(KEEP_ALIVE_S))

    # -- put
    async def put_request(self, request_id: str, body: dict[str, Any], sink: Callable[[Event], None]) -> None:
        """Queue one request in Redis; ``sink`` gets its results (``Event``s) as they arrive."""
        self._local[request_id] = sink
        prompt = str(body.get("prompt", ""))
        record = {"request_id": request_id, "request_queue_name": self.req_queue(),
                  "response_queue_name": self.resp_queue(),
                  "raw": {**body, "prompt_token_ids": list(prompt.encode())}}
        await self._puts.put((request_id, json.dumps(record).encode()))

    async def _put_worker(self) -> None:
        while True:
            batch = [await self._puts.get()]
            while len(batch) < PUT_BATCH and not self._puts.empty():
                batch.append(self._puts.get_nowait())
            await self._rpush(self.req_queue(), [raw for _, raw in batch])
            await self._incr(self.load_table(), len(batch), self.name)

    # -- get
    async def get_requests(self, batch: int) -> list[dict[str, Any]]:
        """FastDeploy's ``get_requests`` for ``batch`` free slots: popped requests, decoded."""
        if batch < 1:
            return []
        mini = (batch + 1) // 2
        batches = []
        for _ in range(2):
            if batch >= mini:
                batches.append(mini)
                batch -= mini
            elif batch > 0:
                batches.append(batch)
                batch = 0
        own = self.req_queue()
        popped: list[tuple[str, bytes]] = []
        for size in batches:
            elements = await self._lpop(own, size)
            if not elements:
                break
            await self._incr(self.load_table(), -len(elements), self.name)
            popped += [(own, e) for e in elements]

        candidates: list[str] = []
        other_table = ""
        if not popped and batches:
            members: list[bytes] = []
            for _ in range(min(LOAD_LOOKUP_NUM, self.cfg.load_shards_num)):
                other_table = self.load_table(self._lookup_slot % self.cfg.load_shards_num)
                members = cast(list[bytes], await self.client.zrangebyscore(
                    other_table, self.cfg.min_load_score, "+inf", start=0, num=LOAD_COUNT))
                self._lookup_slot += 1
                if members:
                    break
            names = [m.decode() for m in members]
            if names:
                candidates = [n for n in self.rng.sample(names, k=min(SAMPLE, len(names))) if n != self.name]
        if candidates:
            lucky = self.rng.choice(candidates)
            elements = cast(list[bytes], await self.client.lpop(self.req_queue(lucky), batches[0]) or [])
            if elements:
                await self._incr(other_table, -len(elements), lucky)
                popped += [(self.req_queue(lucky), e) for e in elements]
            elif not await self.client.exists(self._ins(lucky)):
                await self.client.zrem(other_table, lucky)
        if not popped:
            keys = [own] + [self.req_queue(n) for n in candidates]
            element = cast(tuple[bytes, bytes] | None, await self.client.blpop(keys, timeout=BLPOP_REQUEST_TIMEOUT_S))
            if element is None:
                return []
            queue = element[0].decode()
            owner = self._name_of(queue)
            await self._incr(other_table if owner != self.name else self.load_table(), -1, owner)
            popped.append((queue, element[1]))

        taken: list[dict[str, Any]] = []
        back: dict[str, list[bytes]] = {}
        prefill_tokens = 0
        for queue, raw in popped:
            request = json.loads(raw)
            prefill_tokens += len(request["raw"].get("prompt_token_ids", ()))
            if back or (taken and prefill_tokens > self.cfg.max_num_batched_tokens):
                back.setdefault(queue, []).append(raw)  # FastDeploy: everything after the first misfit
                continue
            taken.append(request)
        for queue, raws in back.items():
            await self.client.lpush(queue, *raws)
            owner = self._name_of(queue)
            await self._incr(other_table if owner != self.name else self.load_table(), len(raws), owner,
                             remove_at_zero=False)
        self.stolen += sum(1 for r in taken if r["request_queue_name"] != own)
        return taken

    async def _insert_loop(self) -> None:
        while not self._is_leaving:
            free = self.cfg.max_num_seqs - self._in_flight
            if free <= 0:
                self._freed.clear()
                await self._freed.wait()
                continue
            requests = await self.get_requests(min(free, MAX_PREFILL_BATCH))
            if not requests:
                await asyncio.sleep(EMPTY_GET_SLEEP_S)
                continue
            for request in requests:
                self._in_flight += 1
                task = asyncio.create_task(self._serve(request))
                self._serving.add(task)
                task.add_done_callback(self._serving.discard)

    async def _serve(self, request: dict[str, Any]) -> None:
        request_id = request["request_id"]
        reply_to = request["response_queue_name"]
        try:
            async for chunk in self.engine(request["raw"]):
                self._result(reply_to, {"id": request_id, "n": chunk.tokens, "done": chunk.finished,
                                        "by": self.name, "error": chunk.error})
                if chunk.finished:
                    break
        except Exception as exc:  # noqa: BLE001 - the engine's stream broke: its client gets an error
            self._result(reply_to, {"id": request_id, "n": 0, "done": True, "by": self.name,
                                    "error": f"{type(exc).__name__}: {exc}"})
        finally:
            self._in_flight -= 1
            self._freed.set()

    # -- results
    def _result(self, reply_to: str, event: Event) -> None:
        if reply_to == self.resp_queue():
            self._deliver(event)
        else:
            self._relay.put_nowait((reply_to, json.dumps(event).encode()))

    def _deliver(self, event: Event) -> None:
        sink = self._local.get(event["id"])
        if sink is None:
            return
        if event["done"]:
            del self._local[event["id"]]
        sink(event)

    async def _relay_worker(self) -> None:
        while True:
            batch = [await self._relay.get()]
            while len(batch) < RESULT_BATCH and not self._relay.empty():
                batch.append(self._relay.get_nowait())
            by_queue: dict[str, list[bytes]] = {}
            for queue, raw in batch:
                by_queue.setdefault(queue, []).append(raw)
            for queue, raws in by_queue.items():
                await self._rpush(queue, raws)

    async def _results_worker(self) -> None:
        own = self.resp_queue()
        while True:
            raws = await self._lpop(own, RESULT_BATCH)
            if not raws:
                element = cast(tuple[bytes, bytes] | None,
                               await self.client.blpop([own], timeout=BLPOP_RESPONSE_TIMEOUT_S))
                if element is None:
                    continue
                raws = [element[1]]
            for raw in raws:
                self._deliver(json.loads(raw))
