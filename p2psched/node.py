"""The async node: runs the scheduler's decisions over sockets, Redis and the engine thread.

One event loop owns every socket. Every long-lived loop is a child of one ``asyncio.TaskGroup``
in ``Node.run``:

    steal server    ROUTER: Steal -> Grant (idempotent by steal id)
    result server   ROUTER: Tokens / Heartbeat from thieves -> Ack / HeartbeatAck / Cancel
    peer readers    one per peer link (``peers.py``): grants and origin replies
    ticker          leases, deadlines, heartbeats, retransmits
    registry        heartbeat our record, refresh the peer table (last-known when Redis is down)
    stealer         woken when this node runs out of queued work, plus a periodic re-check
    http            the OpenAI-compatible surface (``http_api.py``)
    shutdown        SIGTERM: drain, deregister, exit 0
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import zmq
import zmq.asyncio

from . import PROTOCOL_VERSION
from .config import NodeConfig
from .engine import ChatTemplateFn, Engine, EngineOutput, EngineRunner, TextStreamFactory, Tokenizer
from .errors import RegistryUnavailable, RequestRejected
from .peers import PeerLinks
from .policy import PeerLoad, choose_victims
from .protocol import Ack, Cancel, Grant, Heartbeat, HeartbeatAck, Sampling, Steal, Tokens, encode
from .registry import NodeRecord, Registry
from .request import Request
from .scheduler import ClientEvent, Effects, Scheduler, SchedulerParams
from .stats import Stats
from .transport import DropLog, bind, make_socket, send_now

log = logging.getLogger(__name__)

TICK_S = 0.05
PUBLISH_MIN_GAP_S = 0.05  # load changes reach Redis at most this often (and every heartbeat)
PEER_REFRESH_MIN_GAP_S = 0.1  # an idle node re-reads the registry at most this often
GRANT_CACHE = 1024


class _Shutdown(Exception):
    """Raised inside the task group once draining is complete: ends every loop."""


@dataclass
class Handle:
    request: Request
    events: asyncio.Queue[ClientEvent]

    @property
    def request_id(self) -> str:
        return self.request.request_id


class Node:
    def __init__(self, config: NodeConfig, engine: Engine, tokenizer: Tokenizer, text_stream: TextStreamFactory,
                 chat_template: ChatTemplateFn):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.text_stream = text_stream
        self.chat_template = chat_template
        self.node_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.stats = Stats()
        limits = engine.limits
        self.name = config.node_name or f"node-{self.node_id[:6]}"
        self.scheduler = Scheduler(SchedulerParams(
            self.node_id, self.name, engine.model_id, limits, config.scheduler.ttl,
            config.scheduler.lease_timeout, config.max_queue_len), self.stats)
        self.is_draining = False
        self.ready = asyncio.Event()
        self.peers: dict[str, PeerLoad] = {}
        self.is_registry_stale = False
        self.http_url = ""
        self.steal_endpoint = ""
        self.result_endpoint = ""
        self._seq = 0
        self._handles: dict[str, Handle] = {}
        self._ctx = zmq.asyncio.Context()
        self._drops = DropLog(self.stats)
        self._links = PeerLinks(self._ctx, self.node_id, self._drops, self._on_grant, self._on_origin_message)
        self._steal_sock = make_socket(self._ctx, zmq.ROUTER)
        self._result_sock = make_socket(self._ctx, zmq.ROUTER)
        self._grants: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._wake_stealer = asyncio.Event()
        self._load_changed = asyncio.Event()
        self._published_pending = -1
        self._peers_refreshed_at = -1e9
        self._stop_requested = asyncio.Event()
        self._rng = random.Random()
        self._runner: EngineRunner | None = None
        self._registry: Registry | None = None

    # ---- what the HTTP layer uses ----

    def submit(self, prompt_token_ids: list[int], sampling: Sampling) -> Handle:
        """Accept a request (raises ``RequestRejected``); tokens arrive on the handle's queue."""
        if self.is_draining:
            raise RequestRejected("the server is shutting down", 503, "server_shutting_down")
        self._seq += 1
        request_id = f"{self.node_id[:16]}-{self._seq}"
        request = self.scheduler.submit(request_id, prompt_token_ids, sampling, time.time())
        handle = Handle(request, asyncio.Queue())
        self._handles[request_id] = handle
        self._apply(self.scheduler.admit(time.time()))
        self._wake_stealer_if_idle()
        return handle

    def cancel(self, request_id: str) -> None:
        """The client went away: stop the request wherever it runs."""
        if request_id in self._handles:
            self._apply(self.scheduler.cancel(request_id, time.time()))
            self._handles.pop(request_id, None)

    def done(self, request_id: str) -> None:
        self._handles.pop(request_id, None)

    @property
    def num_in_flight(self) -> int:
        """Client requests accepted and not yet answered."""
        return len(self._handles)

    def snapshot(self) -> dict[str, object]:
        return {
            "node_id": self.node_id, "name": self.name, "model_id": self.engine.model_id,
            "draining": self.is_draining, "registry_stale": self.is_registry_stale,
            "steal_endpoint": self.steal_endpoint, "result_endpoint": self.result_endpoint,
            "peers": sorted(p.name for p in self.peers.values()),
            "load": self.scheduler.load(), "stats": self.stats.as_dict(),
            "engine": getattr(self.engine, "stats", dict)(),
        }

    def request_stop(self) -> None:
        self._stop_requested.set()

    # ---- life cycle ----

    async def run(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        host = cfg.host
        steal_port = bind(self._steal_sock, host, cfg.steal_port)
        result_port = bind(self._result_sock, host, cfg.result_port)
        self.steal_endpoint = f"tcp://{cfg.public_host}:{cfg.advertise_steal_port or steal_port}"
        self.result_endpoint = f"tcp://{cfg.public_host}:{cfg.advertise_result_port or result_port}"
        self._runner = EngineRunner(self.engine, loop, self._on_engine_outputs, cfg.min_step_ms / 1000)
        self._runner.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass
        from .http_api import HttpServer

        http = HttpServer(self)
        try:
            async with asyncio.TaskGroup() as group:
                self._links.start(group)
                self.http_url = await http.start(host, cfg.port, cfg.public_host, cfg.metrics_port)
                group.create_task(self._steal_server(), name="steal-server")
                group.create_task(self._result_server(), name="result-server")
                group.create_task(self._ticker(), name="ticker")
                group.create_task(self._watch_engine(), name="engine-watch")
                if cfg.scheduler.is_global:
                    self._registry = Registry(cfg.scheduler)
                    await self._register_first()  # "up" (and /health 200) means listed in the registry
                    group.create_task(self._registry_loop(), name="registry")
                    group.create_task(self._stealer(), name="stealer")
                group.create_task(self._shutdown(http), name="shutdown")
                log.info("node %s (%s) up: http %s steal %s result %s scheduler=%s model=%s", self.name,
                         self.node_id, self.http_url, self.steal_endpoint, self.result_endpoint,
                         cfg.scheduler.name, self.engine.model_id)
                self.ready.set()
        except* _Shutdown:
            pass
        finally:
            await http.stop()
            if self._runner is not None:
                self._runner.stop()
            self._links.close()
            self._steal_sock.close(0)
            self._result_sock.close(0)
            if self._registry is not None:
                await self._registry.close()
            self._ctx.term()
        log.info("node %s stopped", self.name)

    async def _shutdown(self, http: object) -> None:
        await self._stop_requested.wait()
        log.info("draining: %d own and %d stolen-in requests in flight",
                 len(self._handles), len(self.scheduler.remote))
        self.is_draining = True
        self.scheduler.is_accepting_steals = False
        self._wake_stealer.set()
        if self._registry is not None:
            try:
                await self._registry.deregister(self.node_id)
            except RegistryUnavailable as exc:
                log.warning("could not deregister (Redis unavailable: %s); the record will expire", exc)
        deadline = time.monotonic() + self.config.scheduler.ttl
        while (self.scheduler.requests or len(self.scheduler.remote) or self._handles) \
                and time.monotonic() < deadline:
            await asyncio.sleep(TICK_S)
        raise _Shutdown()

    # ---- effects ----

    def _apply(self, fx: Effects) -> None:
        runner = self._runner
        self._note_load_change()
        for event in fx.client:
            handle = self._handles.get(event.request_id)
            if handle is not None:
                handle.events.put_nowait(event)
        if runner is not None:
            for engine_request in fx.engine_add:
                runner.add(engine_request)
            for request_id in fx.engine_abort:
                runner.abort(request_id)
        for origin_id, message in fx.to_origin:
            if not self._links.send_to_origin(origin_id, message):
                self.stats.sends_failed += 1
        for thief_id, message in fx.to_thief:
            if not send_now(self._result_sock, [thief_id.encode(), encode(message)]):
                self.stats.sends_failed += 1

    def _wake_stealer_if_idle(self) -> None:
        if self.scheduler.steal_capacity() is not None and not self.is_draining:
            self._wake_stealer.set()

    def _on_engine_outputs(self, outputs: list[EngineOutput], busy_s: float) -> None:
        self._apply(self.scheduler.on_engine_outputs(outputs, busy_s, time.time()))
        self._wake_stealer_if_idle()

    def _on_grant(self, grant: Grant) -> None:
        if grant.tasks:
            self._apply(self.scheduler.on_grant(grant, time.time()))

    def _on_origin_message(self, message: Ack | HeartbeatAck | Cancel) -> None:
        now = time.time()
        if isinstance(message, Ack):
            self.scheduler.on_ack(message, now)
        elif isinstance(message, HeartbeatAck):
            self._apply(self.scheduler.on_heartbeat_ack(message, now))
        else:
            self._apply(self.scheduler.on_cancel(message, now))
        self._wake_stealer_if_idle()

    # ---- loops ----

    async def _steal_server(self) -> None:
        while True:
            frames = await self._steal_sock.recv_multipart()
            peer, body = frames[0], frames[1:]
            steal = self._drops.decode("steal", peer, body, (Steal,))
            if not isinstance(steal, Steal):
                continue
            cached = self._grants.get(steal.steal_id)
            if cached is not None and cached[0] == steal.thief_id:
                reply = cached[1]  # a repeated steal id gets the same grant
            else:
                grant = self.scheduler.on_steal(steal, time.time())
                reply = encode(grant)
                self._grants[steal.steal_id] = (steal.thief_id, reply)
                while len(self._grants) > GRANT_CACHE:
                    self._grants.popitem(last=False)
                if grant.tasks:
                    self._note_load_change()
                    log.info("granted %d request(s) to %s", len(grant.tasks), steal.thief_name)
            send_now(self._steal_sock, [peer, reply])

    async def _result_server(self) -> None:
        while True:
            frames = await self._result_sock.recv_multipart()
            peer, body = frames[0], frames[1:]
            message = self._drops.decode("result", peer, body, (Tokens, Heartbeat))
            if not isinstance(message, (Tokens, Heartbeat)):
                continue
            if message.thief_id.encode() != peer:
                self._drops.drop("result", peer, "thief id does not match the connection")
                continue
            now = time.time()
            if isinstance(message, Tokens):
                self._apply(self.scheduler.on_tokens(message, now))
            else:
                self._apply(self.scheduler.on_heartbeat(message, now))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self._apply(self.scheduler.tick(time.time()))
            self._wake_stealer_if_idle()

    async def _watch_engine(self) -> None:
        assert self._runner is not None
        await self._runner.stopped.wait()
        if self._runner.failure is not None:
            self._apply(self.scheduler.on_engine_failure(repr(self._runner.failure)))
            raise RuntimeError("engine thread failed") from self._runner.failure

    def _record(self) -> NodeRecord:
        load = self.scheduler.load()
        return NodeRecord(self.node_id, self.name, PROTOCOL_VERSION, self.engine.model_id, self.steal_endpoint,
                          self.result_endpoint, self.http_url, self.started_at, time.time(),
                          load["pending"], load["pending_tokens"], load["running"], load["free_slots"],
                          load["free_kv_tokens"])

    def _note_load_change(self) -> None:
        pending = len(self.scheduler.pending)
        if pending != self._published_pending:
            self._load_changed.set()

    async def _refresh_peers(self) -> None:
        assert self._registry is not None
        records = await self._registry.nodes()
        self._peers_refreshed_at = time.monotonic()
        self.peers = {r.node_id: r.as_peer() for r in records
                      if r.node_id != self.node_id and r.version == PROTOCOL_VERSION}
        for peer in self.peers.values():
            if peer.model_id == self.engine.model_id:
                self._links.link(peer)  # connect early: the first steal must not wait for a handshake
        self._links.prune(set(self.peers) | self.scheduler.remote.origins())

    async def _register_first(self) -> None:
        assert self._registry is not None
        try:
            await self._registry.heartbeat(self._record())
        except RegistryUnavailable as exc:  # start anyway; the registry loop keeps trying
            self.stats.registry_errors += 1
            self.is_registry_stale = True
            log.warning("registry unavailable at start (%s): serving alone until it is back", exc)

    async def _registry_loop(self) -> None:
        """Heartbeat every interval, and soon after our queue length changes (rate-limited)."""
        assert self._registry is not None
        interval = self.config.scheduler.heartbeat_interval
        while not self.is_draining:
            try:
                self._load_changed.clear()
                record = self._record()
                await self._registry.heartbeat(record)
                self._published_pending = record.pending
                if time.monotonic() - self._peers_refreshed_at >= interval:
                    await self._refresh_peers()
                if self.is_registry_stale:
                    log.info("registry reachable again: re-registered")
                self.is_registry_stale = False
                self._wake_stealer_if_idle()
            except RegistryUnavailable as exc:
                self.stats.registry_errors += 1
                if not self.is_registry_stale:
                    log.warning("registry unavailable (%s): serving on, stealing from %d last-known peer(s)",
                                exc, len(self.peers))
                self.is_registry_stale = True
            await asyncio.sleep(PUBLISH_MIN_GAP_S)
            try:
                await asyncio.wait_for(self._load_changed.wait(), max(0.0, interval - PUBLISH_MIN_GAP_S))
            except TimeoutError:
                pass

    async def _stealer(self) -> None:
        cfg = self.config.scheduler
        while not self.is_draining:
            try:
                await asyncio.wait_for(self._wake_stealer.wait(), cfg.recheck_interval)
            except TimeoutError:
                pass
            self._wake_stealer.clear()
            if self.is_draining:
                return
            if self.scheduler.steal_capacity() is None:
                continue
            victims = choose_victims(self.peers.values(), self.node_id, self.engine.model_id,
                                     cfg.min_load_score, self._rng)
            if not victims and not self.is_registry_stale \
                    and time.monotonic() - self._peers_refreshed_at >= PEER_REFRESH_MIN_GAP_S:
                try:
                    await self._refresh_peers()  # the table may be a heartbeat old: look again
                except RegistryUnavailable:
                    self.is_registry_stale = True
                victims = choose_victims(self.peers.values(), self.node_id, self.engine.model_id,
                                         cfg.min_load_score, self._rng)
            for victim in victims:
                capacity = self.scheduler.steal_capacity()
                if capacity is None or self.is_draining:
                    break
                max_requests, max_tokens = capacity
                self.stats.steals_attempted += 1
                steal = Steal(PROTOCOL_VERSION, uuid.uuid4().hex, self.node_id, self.name, self.engine.model_id,
                              min(max_requests, 1024), max_tokens)
                grant = await self._links.steal(victim, steal, cfg.steal_timeout)
                if grant is None:
                    self.stats.steals_timed_out += 1
                    continue
                self.peers[victim.node_id] = PeerLoad(**{**victim.__dict__, "pending": grant.victim_pending})
                if grant.tasks:
                    self.stats.steals_granted += 1
                    break
                self.stats.steals_empty += 1
