"""The Redis registry: who is in the cluster, where to reach them, how loaded they are.

Redis is a registry only; no request or token passes through it. Key schema (docs/registry.md):

    p2psched:{<topic>.<shard>}:node:<node_id>   hash, the node record, expires without heartbeat
    p2psched:{<topic>.<shard>}:load             sorted set, member node_id, score = pending requests

A node lives in shard crc32(node_id) % shards; the hash tag ``{<topic>.<shard>}`` keeps a node's
record and its shard's index in one Redis Cluster slot, so the heartbeat script is atomic there
too. Readers scan every shard, drop index members whose record expired, and check model ids.

Access: an ACL user, a password (or a file holding it) and TLS (``rediss://``, a CA, a client
certificate) go to redis-py's own options. ``verify_access`` runs every command a node uses, once,
on our key names, so a node whose login, ACL rules or certificates Redis refuses stops at start
with one line, while a Redis that is merely unreachable lets it start and serve alone (DESIGN §4).

Sentinel: with ``--scheduler-sentinels`` the client is redis-py's Sentinel client of the master
named by ``--scheduler-sentinel-master``; every new connection asks the sentinels where the master
is. A failover reads as a short outage (``RegistryUnavailable``); the next heartbeat after it
writes the whole record to the new master (loading the heartbeat script there if it lacks it).

Run ``python -m p2psched.registry`` to list the nodes (table, ``--json`` or ``--watch``).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import sys
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .cli import Parser
from .core.config import SchedulerConfig
from .core.errors import ConfigError, RegistryUnavailable
from .core.policy import PeerLoad
from .transport import is_valid_endpoint

# KEYS[1] node hash, KEYS[2] load index; ARGV: ttl_ms, score, node_id, then field/value pairs.
_HEARTBEAT = """
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
_PROBE_TTL_MS = 10_000  # verify_access's throw-away record, should its clean-up not run
_ALERT_WAIT_S = 0.5  # after a TLS connection reset at start: how long to listen for the alert


# What a Redis round trip raises when Redis goes away. uvloop raises RuntimeError ("unable to
# perform operation on <TCPTransport closed=True>") for a write to a connection Redis just
# closed, and redis-py passes it through; at this boundary it is an outage like the others.
_CONNECTION_ERRORS = (redis.exceptions.RedisError, OSError, RuntimeError)

_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


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
    public_key: str = ""  # CurveZMQ public key (z85) of the node's sockets; "" without keys
    warning: str = ""  # why peers on other hosts cannot reach the node (a loopback address); "" when they can

    @property
    def load_score(self) -> int:
        return self.pending

    def problem(self) -> str | None:
        """Why a peer cannot use this record (checked before anything connects to it), or None."""
        if not _NODE_ID.fullmatch(self.node_id):
            return "bad node id"
        if not 0 < len(self.model_id) <= 128 or len(self.name) > 256:
            return "bad model id or name"
        for endpoint in (self.steal_endpoint, self.result_endpoint):
            if not is_valid_endpoint(endpoint):
                return f"unusable endpoint {endpoint[:80]!r}"
        if self.public_key and (len(self.public_key) != 40 or not self.public_key.isprintable()):
            return "bad public key"
        if len(self.warning) > 1024:
            return "warning too long"
        if min(self.pending, self.pending_tokens, self.running) < 0 or max(self.pending, self.running) > 1 << 31:
            return "load out of range"
        return None

    def as_peer(self) -> PeerLoad:
        return PeerLoad(self.node_id, self.name, self.model_id, self.steal_endpoint, self.result_endpoint,
                        self.pending, self.pending_tokens, self.running, self.public_key)

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


def redis_password(cfg: SchedulerConfig) -> str | None:
    """The password from ``--scheduler-password-file`` (its first line, stripped) or the flag."""
    if not cfg.password_file:
        return cfg.password or None
    try:
        with open(cfg.password_file, encoding="utf-8") as file:
            password = file.readline().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the Redis password file {cfg.password_file}: "
                          f"{exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the Redis password file {cfg.password_file} is not UTF-8 text") from exc
    if not password:
        raise ConfigError(f"the Redis password file {cfg.password_file} is empty")
    return password


def _tls_options(cfg: SchedulerConfig) -> dict[str, Any]:
    if not cfg.tls:
        return {}
    files = (("ca", cfg.tls_ca_file), ("cert", cfg.tls_cert_file), ("key", cfg.tls_key_file))
    for flag, path in files:
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"cannot read --scheduler-tls-{flag}-file {path}: "
                                  f"{exc.strerror or exc}") from exc
    return {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True,
            "ssl_ca_certs": cfg.tls_ca_file or None, "ssl_certfile": cfg.tls_cert_file or None,
            "ssl_keyfile": cfg.tls_key_file or None}


def _fail_fast(cfg: SchedulerConfig, timeout: float) -> dict[str, Any]:
    """Connection options of every client here: no retries, short timeouts, TLS if asked."""
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0, **_tls_options(cfg)}


def connect(cfg: SchedulerConfig, timeout: float | None = None) -> aioredis.Redis:
    """An asyncio client that fails fast: callers decide when to retry. The default timeout is
    0.5 s, 2 s over TLS (a handshake to a remote Redis takes round trips of its own).

    With ``--scheduler-sentinels``, redis-py's client of the master the sentinels name: each new
    connection asks them (the one that answered last first) where the master is, and a connection
    that fails is dropped, so the command after a failover goes to the new master. The sentinels
    get the same timeouts and TLS options but no login (docs/registry.md, "Sentinel").

    Raises ``ConfigError`` when the password file or a TLS file cannot be read."""
    if timeout is None:
        timeout = 2.0 if cfg.tls else 0.5
    login: dict[str, Any] = {"db": cfg.db, "username": cfg.username or None, "password": redis_password(cfg)}
    if not cfg.sentinels:
        return aioredis.Redis(host=cfg.host, port=cfg.port, **login, **_fail_fast(cfg, timeout))
    sentinels = Sentinel(cfg.sentinel_addresses, sentinel_kwargs=_fail_fast(cfg, timeout))  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinels.master_for(cfg.sentinel_master, **login, **_fail_fast(cfg, timeout))
    return client


async def _close(client: aioredis.Redis) -> None:
    """Close ``client`` and, for a Sentinel client, its sentinels' clients (it does not own them)."""
    pool = client.connection_pool
    try:
        await client.aclose()
    finally:
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


def redis_location(cfg: SchedulerConfig) -> str:
    """The registry as messages name it: Redis's address, or the master and its sentinels."""
    if cfg.sentinels:
        return f"Redis master {cfg.sentinel_master!r} of the sentinels {cfg.sentinels}"
    return f"Redis at {cfg.host}:{cfg.port}"


def _no_master(cfg: SchedulerConfig) -> str:
    return (f"no sentinel of {cfg.sentinels} named a live master {cfg.sentinel_master!r} (unreachable, or the "
            f"master is down and not yet replaced)")


def _is_demoted(exc: BaseException) -> bool:
    """READONLY: a replica answered a write. Under Sentinel, a master that a failover demoted; inside
    a script it comes as a plain ``ResponseError``."""
    return isinstance(exc, redis.exceptions.ReadOnlyError) \
        or (isinstance(exc, redis.exceptions.ResponseError) and "READONLY" in str(exc))


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a redis-py error, if any (redis-py wraps it, keeping the context)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _tls_reason(error: ssl.SSLError, cfg: SchedulerConfig) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        trusted = cfg.tls_ca_file or "the system's CAs"
        return f"Redis's certificate did not verify against {trusted}: {error.verify_message}"
    reason = error.reason or ""
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        ours = cfg.tls_cert_file or "none given"
        return f"Redis refused our client certificate ({ours}): {reason.lower().replace('_', ' ')}"
    return " ".join(str(error).split())


def access_error(exc: BaseException, cfg: SchedulerConfig) -> ConfigError | RegistryUnavailable:
    """Translate a redis-py (or socket) error: Redis refused us (a fix in our configuration or
    Redis's is needed) is a ``ConfigError``; Redis could not be reached (yet) is
    ``RegistryUnavailable``, and so, under Sentinel, are no live master and a demoted one (a
    failover under way). Messages are one line."""
    where = redis_location(cfg)
    user = f"user {cfg.username!r}" if cfg.username else "the default user"
    text = " ".join(str(exc).split())
    tls_error = _ssl_error(exc)
    if tls_error is not None:
        return ConfigError(f"TLS to {where} failed: {_tls_reason(tls_error, cfg)}")
    if isinstance(exc, redis.exceptions.AuthenticationError):
        if not (cfg.password or cfg.password_file):
            return ConfigError(f"{where} refused {user} without a password (give "
                               f"--scheduler-password-file): {text}")
        return ConfigError(f"{where} refused the login of {user}: {text}")
    if isinstance(exc, (redis.exceptions.OutOfMemoryError, redis.exceptions.BusyLoadingError,
                        redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)):
        return RegistryUnavailable(text)  # Redis's own state; it may pass
    if cfg.sentinels:
        if isinstance(exc, MasterNotFoundError):
            return RegistryUnavailable(_no_master(cfg))
        if _is_demoted(exc):  # the sentinels name the new master to the next connection
            return RegistryUnavailable(f"{where} was demoted by a failover: {text}")
        if isinstance(exc, redis.exceptions.ResponseError) and re.search(r"unknown command .?SENTINEL", text, re.IGNORECASE):
            return ConfigError(f"an address in --scheduler-sentinels {cfg.sentinels} is a Redis, not a sentinel: "
                               f"{text}")
    if isinstance(exc, (redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError,
                        redis.exceptions.ReadOnlyError, redis.exceptions.MovedError)) \
            or (isinstance(exc, redis.exceptions.ResponseError) and _REFUSALS.search(text)):
        # NOPERM (also inside the heartbeat script), READONLY (a replica), MOVED (a cluster)
        return ConfigError(f"{where} refused a command p2psched needs for {user}: {text} "
                           f"(see 'Securing the registry' in docs/registry.md)")
    # Anything else Redis answers (MISCONF when it cannot save, MASTERDOWN, BUSY) is its own
    # state and may pass, like an outage.
    return RegistryUnavailable(text or type(exc).__name__)


# Inside a script Redis 6.2 says "The user executing the script can't run this command" or
# "can't access at least one of the keys"; Redis 7 says NOPERM there too.
_REFUSALS = re.compile(r"\b(NOPERM|NOAUTH|WRONGPASS|READONLY|MOVED)\b|can't run this command|can't access "
                       r"at least one of the keys|no permissions")


async def verify_access(cfg: SchedulerConfig, timeout: float = 2.0) -> None:
    """One pass over every command a node sends Redis, on our key names, with ``cfg``'s login
    and TLS settings. Raises ``ConfigError`` when Redis refuses the TLS handshake, the login or
    a command (ACL); ``RegistryUnavailable`` when it cannot be reached."""
    registry = Registry(cfg, connect(cfg, timeout))
    try:
        await registry.probe()
    except RegistryUnavailable as exc:
        raise await _outage_or_refusal(exc, cfg, timeout) from exc.__cause__
    finally:
        try:
            await registry.close()
        except (redis.exceptions.RedisError, OSError):
            pass


async def _outage_or_refusal(exc: RegistryUnavailable, cfg: SchedulerConfig,
                             timeout: float) -> ConfigError | RegistryUnavailable:
    """What a ``RegistryUnavailable`` from a Registry call really was: ``access_error`` of its
    cause, and over TLS a connection reset is asked again (``_tls_refusal``)."""
    cause = exc.__cause__ or exc
    error = access_error(cause, cfg)
    if isinstance(error, RegistryUnavailable) and isinstance(cause, MasterNotFoundError):
        return await _sentinel_refusal(cfg, timeout) or error
    if isinstance(error, RegistryUnavailable) and cfg.tls and not cfg.sentinels \
            and isinstance(cause, redis.exceptions.ConnectionError) \
            and not isinstance(cause, redis.exceptions.TimeoutError):
        return await _tls_refusal(cfg, timeout) or error
    return error


async def _sentinel_refusal(cfg: SchedulerConfig, timeout: float) -> ConfigError | None:
    """When no sentinel named a live master: ask each, quietly, which masters it monitors. One
    that wants a login (p2psched sends sentinels none), or answers that none of them monitors
    ``--scheduler-sentinel-master``, needs a fix in the configuration; None otherwise."""
    sentinels = Sentinel(cfg.sentinel_addresses, sentinel_kwargs=_fail_fast(cfg, timeout))  # type: ignore[no-untyped-call]
    names: set[str] = set()
    answered = False
    try:
        for (host, port), client in zip(cfg.sentinel_addresses, sentinels.sentinels):
            try:
                masters = await client.sentinel_masters()  # {name: state} (RESP2)
                names.update(masters if isinstance(masters, dict) else ())
                answered = True
            except redis.exceptions.AuthenticationError as exc:
                return ConfigError(f"sentinel {host}:{port} wants a login, and p2psched sends sentinels none: "
                                   f"{' '.join(str(exc).split())} (see 'Sentinel' in docs/registry.md)")
            except _CONNECTION_ERRORS:
                continue
    finally:
        try:
            await sentinels.aclose()
        except _CONNECTION_ERRORS:
            pass
    if answered and cfg.sentinel_master not in names:
        return ConfigError(f"the sentinels {cfg.sentinels} monitor no master named {cfg.sentinel_master!r} (they "
                           f"monitor: {', '.join(sorted(names)) or 'none'}); give --scheduler-sentinel-master")
    return None


async def _tls_refusal(cfg: SchedulerConfig, timeout: float) -> ConfigError | None:
    """Ask again, quietly, whether Redis refuses our client certificate.

    Under TLS 1.3 a server checks the client's certificate after the client has finished its
    handshake, so redis-py's first command is already on the wire when the refusal comes; the
    server then closes a socket with unread bytes, and the reset can overtake its alert. Here
    we finish a handshake with the same settings and send nothing: a refusal arrives as the
    alert, an acceptance as silence (or session tickets) until ``ALERT_WAIT_S``."""
    context = ssl.create_default_context()
    try:
        if cfg.tls_cert_file:
            context.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
        if cfg.tls_ca_file:
            context.load_verify_locations(cfg.tls_ca_file)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(cfg.host, cfg.port, ssl=context), timeout)
    except ssl.SSLError as exc:
        return ConfigError(f"TLS to Redis at {cfg.host}:{cfg.port} failed: {_tls_reason(exc, cfg)}")
    except (OSError, TimeoutError):
        return None
    try:
        await asyncio.wait_for(reader.read(1), _ALERT_WAIT_S)
    except ssl.SSLError as exc:
        return ConfigError(f"TLS to Redis at {cfg.host}:{cfg.port} failed: {_tls_reason(exc, cfg)}")
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), _ALERT_WAIT_S)
        except (OSError, TimeoutError):
            pass
    return None


class Registry:
    def __init__(self, cfg: SchedulerConfig, client: aioredis.Redis | None = None):
        self._cfg = cfg
        self._keys = Keys(cfg.topic, cfg.load_shards_num)
        self._client = client or connect(cfg)
        self._script = self._client.register_script(_HEARTBEAT)
        # One round trip at a time: a node holds one connection to Redis, not one per loop that
        # happens to ask at the same moment (redis-py's pool would grow with the overlap).
        self._one_at_a_time = asyncio.Lock()

    @property
    def keys(self) -> Keys:
        return self._keys

    async def probe(self) -> None:
        """Send each command a node uses, once, with a throw-away member, then remove it.

        The record written lacks the fields readers require, so a reader that meets it before
        we delete it prunes it as expired; it also expires by itself within ten seconds (a
        script refused after its ``HSET`` leaves it behind when ``DEL`` is refused too).
        Raises ``access_error``'s translation of any failure."""
        probe_id = f"probe-{uuid.uuid4().hex}"
        node_key, load_key = self._keys.node_in_shard(0, probe_id), self._keys.load(0)
        try:
            await self._client.script_load(_HEARTBEAT)  # after a Redis restart, EVALSHA needs it
            await self._script(keys=[node_key, load_key],
                               args=[_PROBE_TTL_MS, 0, probe_id, "probe", "1"])
            await self._client.zrevrange(load_key, 0, 0)
            await self._client.hgetall(node_key)
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(node_key)
                pipe.zrem(load_key, probe_id)
                await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            # A script refused half-way keeps its earlier writes: remove them if we may.
            try:
                await self._client.delete(node_key)
            except (redis.exceptions.RedisError, OSError):
                pass
            raise access_error(exc, self._cfg) from exc

    async def heartbeat(self, record: NodeRecord) -> None:
        """Write the record, refresh its TTL and its load score, atomically. Also registers."""
        node_id = record.node_id
        record_hash = record.to_hash()
        record_hash["updated_at"] = repr(time.time())
        args: list[str | int | float] = [int(self._cfg.registry_record_ttl * 1000), record.load_score, node_id]
        for key, value in record_hash.items():
            args += [key, value]
        try:
            async with self._one_at_a_time:
                await self._follow_master()
                await self._script(keys=[self._keys.node(node_id), self._keys.load(self._keys.shard_of(node_id))],
                                   args=args)
        except _CONNECTION_ERRORS as exc:
            raise await self._unavailable(exc) from exc

    async def deregister(self, node_id: str) -> None:
        try:
            async with self._one_at_a_time, self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._keys.node(node_id))
                pipe.zrem(self._keys.load(self._keys.shard_of(node_id)), node_id)
                await pipe.execute()
        except _CONNECTION_ERRORS as exc:
            raise await self._unavailable(exc) from exc

    async def nodes(self) -> list[NodeRecord]:
        """Every live node of this topic, most loaded first; prunes index entries that expired."""
        async with self._one_at_a_time:
            records = await self._read({}, set())
        return sorted(records.values(), key=lambda r: r.load_score, reverse=True)

    async def members(self, known: Mapping[str, NodeRecord], check: Iterable[str] = ()) -> dict[str, NodeRecord]:
        """Live members of this topic, cheaply: one ZREVRANGE per shard for the ids; records are
        read only for ids not in ``known`` and for those in ``check`` (peers that stopped
        answering, and a few more in turn), and the known record is kept for the rest. An id whose
        record has expired is pruned from the index. Commands per call: shards + new + checked,
        whatever the cluster's size (``nodes()`` reads every record)."""
        async with self._one_at_a_time:
            return await self._read(known, set(check))

    async def _read(self, known: Mapping[str, NodeRecord], recheck: set[str]) -> dict[str, NodeRecord]:
        try:
            out: dict[str, NodeRecord] = {}
            for shard in range(self._keys.shards):
                members = [bytes(m) for m in await self._client.zrevrange(self._keys.load(shard), 0, -1)]  # type: ignore[arg-type]
                ids = [m.decode(errors="replace") for m in members]
                fetch = [node_id for node_id in ids if node_id not in known or node_id in recheck]
                fetching = set(fetch)
                out.update((node_id, known[node_id]) for node_id in ids if node_id not in fetching)
                if not fetch:
                    continue
                async with self._client.pipeline(transaction=False) as pipe:
                    for node_id in fetch:
                        pipe.hgetall(self._keys.node_in_shard(shard, node_id))
                    raws = await pipe.execute()
                stale = []
                for node_id, raw in zip(fetch, raws):
                    record = NodeRecord.from_hash(raw) if raw else None
                    if record is None:
                        stale.append(node_id)
                    else:
                        out[node_id] = record
                if stale:
                    await self._client.zrem(self._keys.load(shard), *stale)
            return out
        except _CONNECTION_ERRORS as exc:
            raise await self._unavailable(exc) from exc

    async def _follow_master(self) -> None:
        """Under Sentinel, ask the sentinels where the master is before each heartbeat: a failover
        that leaves the old master up (``SENTINEL FAILOVER``, a healed partition) would otherwise
        find our connection still writing there until the sentinels demote it, seconds later
        (redis-py asks only when it connects). A new answer drops the idle connection; no answer
        changes nothing (the command that follows says whether Redis is reachable)."""
        pool = self._client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            try:
                await pool.get_master_address()  # type: ignore[no-untyped-call]
            except _CONNECTION_ERRORS:
                pass

    async def _unavailable(self, exc: BaseException) -> RegistryUnavailable:
        """An outage, for the caller to retry. READONLY from inside the heartbeat script means our
        connection still goes to a master that a failover demoted (redis-py's Sentinel client
        notices only a plain READONLY reply): drop the idle connections, so the next command
        asks the sentinels again."""
        if self._cfg.sentinels and _is_demoted(exc):
            try:
                await self._client.connection_pool.disconnect(inuse_connections=False)
            except _CONNECTION_ERRORS:
                pass
        return RegistryUnavailable(_no_master(self._cfg) if isinstance(exc, MasterNotFoundError) else str(exc))

    async def close(self) -> None:
        await _close(self._client)


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
    for r in records:
        if r.warning and not (model_filter and r.model_id != model_filter):
            buf.write(f"WARNING {r.name} ({r.node_id[:12]}) {r.warning}\n")
    return buf.getvalue()


async def _list_once(cfg: SchedulerConfig, as_json: bool, model: str | None) -> str:
    registry = Registry(cfg, connect(cfg, timeout=2.0))
    try:
        records = await registry.nodes()
    except RegistryUnavailable as exc:  # a refused login or certificate is no outage
        raise await _outage_or_refusal(exc, cfg, 2.0) from exc.__cause__
    finally:
        try:
            await registry.close()
        except (redis.exceptions.RedisError, OSError):
            pass
    if as_json:
        return json.dumps([asdict(r) for r in records if not model or r.model_id == model], indent=2)
    return _table(records, model)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m p2psched.registry",
                                     description="List the nodes registered in a p2psched Redis registry.")
    parser.add_argument("--scheduler-host", "--host", dest="host", default="127.0.0.1")
    parser.add_argument("--scheduler-port", "--port", dest="port", type=int, default=6379)
    parser.add_argument("--scheduler-db", "--db", dest="db", type=int, default=0)
    parser.add_argument("--scheduler-username", "--username", dest="username", default="",
                        help="Redis ACL user (default: the default user)")
    parser.add_argument("--scheduler-password", "--password", dest="password", default="")
    parser.add_argument("--scheduler-password-file", "--password-file", dest="password_file",
                        default="", help="read the Redis password from this file's first line")
    parser.add_argument("--scheduler-tls", "--tls", dest="tls", action="store_true",
                        help="connect to Redis over TLS")
    parser.add_argument("--scheduler-tls-ca-file", "--tls-ca-file", dest="tls_ca_file", default="",
                        help="CA certificate(s) that signed Redis's certificate "
                             "(default: the system's)")
    parser.add_argument("--scheduler-tls-cert-file", "--tls-cert-file", dest="tls_cert_file",
                        default="", help="client certificate for Redis (tls-auth-clients)")
    parser.add_argument("--scheduler-tls-key-file", "--tls-key-file", dest="tls_key_file",
                        default="", help="the client certificate's key")
    parser.add_argument("--scheduler-sentinels", "--sentinels", dest="sentinels", default="",
                        help="Redis Sentinel addresses, host:port,...: list the nodes in the master they "
                             "name (--scheduler-host and --scheduler-port are then not used)")
    parser.add_argument("--scheduler-sentinel-master", "--sentinel-master", dest="sentinel_master",
                        default="mymaster", help="the master's name at the sentinels (default: mymaster)")
    parser.add_argument("--scheduler-topic", "--topic", dest="topic", default="default")
    parser.add_argument("--scheduler-load-shards-num", "--shards", dest="shards", type=int, default=1)
    parser.add_argument("--model", default=None, help="only nodes serving this model id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 1) until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        cfg = SchedulerConfig(host=args.host, port=args.port, db=args.db, username=args.username,
                              password=args.password, password_file=args.password_file,
                              tls=args.tls, tls_ca_file=args.tls_ca_file,
                              tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
                              sentinels=args.sentinels, sentinel_master=args.sentinel_master,
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
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RegistryUnavailable as exc:
        print(f"error: cannot reach {redis_location(cfg)}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
