"""The Redis registry: who is in the cluster, where to reach them, how loaded they are.

Redis is a registry only; no request or token passes through it. Key schema (docs/registry.md):

    p2psched:{<topic>.<shard>}:node:<node_id>   hash, the node record, expires without heartbeat
    p2psched:{<topic>.<shard>}:load             sorted set, member node_id, score = pending requests

A node lives in shard crc32(node_id) % shards; the hash tag ``{<topic>.<shard>}`` keeps a node's
record and its shard's index in one Redis Cluster slot, so the heartbeat script is atomic there
too. Readers scan every shard, drop index members whose record expired, and check model ids.

Run ``python -m p2psched.registry`` to list the nodes (table, ``--json`` or ``--watch``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass, fields

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .cli import Parser
from .config import SchedulerConfig
from .errors import ConfigError, RegistryUnavailable
from .policy import PeerLoad

# KEYS[1] node hash, KEYS[2] load index; ARGV: ttl_ms, score, node_id, then field/value pairs.
_HEARTBEAT = """
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    name: str
    version: int
    model_id: str
    steal_endpoint: str
    result_endpoint: str
    http_url: str
    started_at: float
    updated_at: float = 0.0
    pending: int = 0
    pending_tokens: int = 0
    running: int = 0
    free_slots: int = 0
    free_kv_tokens: int = 0

    @property
    def load_score(self) -> int:
        return self.pending

    def as_peer(self) -> PeerLoad:
        return PeerLoad(self.node_id, self.name, self.model_id, self.steal_endpoint, self.result_endpoint,
                        self.pending, self.pending_tokens, self.running)

    def to_hash(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> NodeRecord | None:
        """Parse a stored record; None if it is incomplete or malformed."""
        data = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
        values: dict[str, object] = {}
        try:
            for f in fields(cls):
                if f.name not in data:
                    if f.name in ("node_id", "steal_endpoint", "result_endpoint", "model_id"):
                        return None
                    continue
                kind = f.type if isinstance(f.type, str) else f.type.__name__
                text = data[f.name]
                values[f.name] = int(text) if kind == "int" else float(text) if kind == "float" else text
            return cls(**values)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return None


class Keys:
    def __init__(self, topic: str, shards: int):
        self.topic = topic
        self.shards = shards

    def shard_of(self, node_id: str) -> int:
        return zlib.crc32(node_id.encode()) % self.shards

    def node(self, node_id: str) -> str:
        return f"p2psched:{{{self.topic}.{self.shard_of(node_id)}}}:node:{node_id}"

    def load(self, shard: int) -> str:
        return f"p2psched:{{{self.topic}.{shard}}}:load"

    def node_in_shard(self, shard: int, node_id: str) -> str:
        return f"p2psched:{{{self.topic}.{shard}}}:node:{node_id}"


def connect(cfg: SchedulerConfig, timeout: float = 0.5) -> aioredis.Redis:
    """An asyncio client that fails fast: callers decide when to retry."""
    return aioredis.Redis(host=cfg.host, port=cfg.port, db=cfg.db, password=cfg.password or None,
                          socket_timeout=timeout, socket_connect_timeout=timeout,
                          retry=Retry(NoBackoff(), 0), health_check_interval=0)


class Registry:
    def __init__(self, cfg: SchedulerConfig, client: aioredis.Redis | None = None):
        self._cfg = cfg
        self._keys = Keys(cfg.topic, cfg.load_shards_num)
        self._client = client or connect(cfg)
        self._script = self._client.register_script(_HEARTBEAT)

    @property
    def keys(self) -> Keys:
        return self._keys

    async def heartbeat(self, record: NodeRecord) -> None:
        """Write the record, refresh its TTL and its load score, atomically. Also registers."""
        node_id = record.node_id
        record_hash = record.to_hash()
        record_hash["updated_at"] = repr(time.time())
        args: list[str | int | float] = [int(self._cfg.registry_record_ttl * 1000), record.load_score, node_id]
        for key, value in record_hash.items():
            args += [key, value]
        try:
            await self._script(keys=[self._keys.node(node_id), self._keys.load(self._keys.shard_of(node_id))],
                               args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise RegistryUnavailable(str(exc)) from exc

    async def deregister(self, node_id: str) -> None:
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._keys.node(node_id))
                pipe.zrem(self._keys.load(self._keys.shard_of(node_id)), node_id)
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise RegistryUnavailable(str(exc)) from exc

    async def nodes(self) -> list[NodeRecord]:
        """Every live node of this topic, most loaded first; prunes index entries that expired."""
        try:
            out: list[NodeRecord] = []
            for shard in range(self._keys.shards):
                members = [bytes(m) for m in await self._client.zrevrange(self._keys.load(shard), 0, -1)]  # type: ignore[arg-type]
                if not members:
                    continue
                ids = [m.decode(errors="replace") for m in members]
                async with self._client.pipeline(transaction=False) as pipe:
                    for node_id in ids:
                        pipe.hgetall(self._keys.node_in_shard(shard, node_id))
                    raws = await pipe.execute()
                stale = []
                for node_id, raw in zip(ids, raws):
                    record = NodeRecord.from_hash(raw) if raw else None
                    if record is None:
                        stale.append(node_id)
                    else:
                        out.append(record)
                if stale:
                    await self._client.zrem(self._keys.load(shard), *stale)
            out.sort(key=lambda r: r.load_score, reverse=True)
            return out
        except (redis.exceptions.RedisError, OSError) as exc:
            raise RegistryUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self._client.aclose()


# ---- python -m p2psched.registry ----

def _table(records: list[NodeRecord], model_filter: str | None) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    now = time.time()
    table = Table(title=f"{len(records)} node(s)")
    for column in ("name", "node id", "model", "steal", "result", "http", "pending", "pending tok",
                   "running", "free slots", "free kv tok", "age s", "seen s ago", "ver"):
        table.add_column(column, no_wrap=True)
    for r in records:
        if model_filter and r.model_id != model_filter:
            continue
        table.add_row(r.name, r.node_id[:12], r.model_id, r.steal_endpoint, r.result_endpoint, r.http_url,
                      str(r.pending), str(r.pending_tokens), str(r.running), str(r.free_slots),
                      str(r.free_kv_tokens), f"{now - r.started_at:.0f}", f"{now - r.updated_at:.1f}",
                      str(r.version))
    buf = StringIO()
    Console(file=buf, width=400).print(table)
    return buf.getvalue()


async def _list_once(cfg: SchedulerConfig, as_json: bool, model: str | None) -> str:
    registry = Registry(cfg, connect(cfg, timeout=2.0))
    try:
        records = await registry.nodes()
    finally:
        await registry.close()
    if as_json:
        return json.dumps([asdict(r) for r in records if not model or r.model_id == model], indent=2)
    return _table(records, model)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m p2psched.registry",
                                     description="List the nodes registered in a p2psched Redis registry.")
    parser.add_argument("--scheduler-host", "--host", dest="host", default="127.0.0.1")
    parser.add_argument("--scheduler-port", "--port", dest="port", type=int, default=6379)
    parser.add_argument("--scheduler-db", "--db", dest="db", type=int, default=0)
    parser.add_argument("--scheduler-password", "--password", dest="password", default="")
    parser.add_argument("--scheduler-topic", "--topic", dest="topic", default="default")
    parser.add_argument("--scheduler-load-shards-num", "--shards", dest="shards", type=int, default=1)
    parser.add_argument("--model", default=None, help="only nodes serving this model id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 1) until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        cfg = SchedulerConfig(host=args.host, port=args.port, db=args.db, password=args.password,
                              topic=args.topic, load_shards_num=args.shards)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        while True:
            text = asyncio.run(_list_once(cfg, args.json, args.model))
            if args.watch is None:
                print(text)
                return 0
            print("\x1b[2J\x1b[H" + time.strftime("%H:%M:%S ") + text, flush=True)
            time.sleep(args.watch)
    except RegistryUnavailable as exc:
        print(f"error: cannot reach Redis at {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
