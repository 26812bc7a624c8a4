"""The async node: runs the scheduler's decisions over sockets, Redis and the engine process.

One event loop owns every socket. ``open()`` binds them all (a port in use or a bad address is
a ``ConfigError``: one line and exit 2) before anything runs; then every long-lived loop is a
child of one ``asyncio.TaskGroup`` in ``Node.run``:

    steal server    ROUTER: Steal -> Grant (idempotent by steal id), Probe -> LoadReport
    result server   ROUTER: Tokens / Heartbeat / Handback from thieves -> Ack / HeartbeatAck / Cancel
    peer readers    one per peer link (``peers.py``): grants, load reports and origin replies
    ticker          leases, deadlines, heartbeats (only while the engine makes progress), retransmits
    registry        heartbeat our record, read who the members are (last-known when Redis is down)
    prober          while this node could steal, ask a few random peers how their queues look
    stealer         woken by reports, grants and freed slots: steals what is older than its own
                    work from the peer whose oldest request waited longest (``core/balance.py``)
    engine reader   one message per engine step (``engine_client.py``): tokens to clients and origins
    engine watch    the engine process died: fail every request, deregister, exit 1
    http            the OpenAI-compatible surface (``http_api.py``, through ``service.py``)
    shutdown        SIGTERM: hand back unstarted stolen tasks, drain, deregister, exit 0

Each loop handles one input at a time inside ``Containment.guard``: bad input from a client, a
peer or Redis is counted and logged, and the loop goes on (``containment.py``). Who may send
what: a Steal, Probe, Tokens, Heartbeat or Handback must come from the connection of the node
id it names (its ZeroMQ routing id, and with CurveZMQ the public key that node published);
steals are served only to registered peers of the same topic and model.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import signal
import time
import uuid
from collections import OrderedDict

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from . import PROTOCOL_VERSION
from .addresses import advertised_host
from .containment import Containment, OncePerMinute
from .core.config import NodeConfig
from .core.engine import ChatTemplateFn, EngineOutput, TextStreamFactory, Tokenizer
from .core.errors import ConfigError, ProtocolError, RegistryUnavailable, RequestRejected
from .core.balance import Balancer
from .core.policy import PeerLoad
from .core.protocol import (
    MAX_COUNT,
    MAX_TASKS_PER_GRANT,
    Ack,
    Cancel,
    Grant,
    Handback,
    Heartbeat,
    HeartbeatAck,
    LoadReport,
    Message,
    Probe,
    Sampling,
    Steal,
    Tokens,
    encode,
)
from .core.scheduler import Effects, Scheduler, SchedulerParams
from .core.stats import Stats
from .core.steals import GrantCache, SentSteals
from .engine_client import EngineClient
from .http_api import HttpServer
from .peers import PeerLinks
from .registry import NodeRecord, Registry
from .security import CurveKeys, warn_if_open
from .service import Handle, ModelInfo, NodeSnapshot
from .transport import DropLog, Sender, bind, make_socket

log = logging.getLogger(__name__)

TICK_S = 0.05
PROBE_INTERVAL_S = 0.02  # each round asks a few random peers how long their queues are, and how old
PEER_REFRESH_MIN_GAP_S = 0.5  # calls from unknown peers re-read the members at most this often
SUSPECT_AFTER_PROBES = 20  # probes a peer left unanswered in a row before its record is read again
MEMBERS_EVERY = 2  # heartbeats per read of the member list (sooner when an unknown peer calls)
RECHECK_EVERY = 4  # member-list reads per record read again, in turn (to prune expired members)
ENGINE_FAILURE_GRACE_S = 5.0  # for clients to get their errors, and for deregistering
KNOWN_KEYS = 4096  # node id -> public key of peers seen in the registry (node ids never reuse keys)


class _Shutdown(Exception):
    """Raised inside the task group once draining is complete: ends every loop."""


class Node:
    def __init__(self, config: NodeConfig, engine: EngineClient, tokenizer: Tokenizer, text_stream: TextStreamFactory,
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
        self.curve = CurveKeys.load(config.curve_key_file, config.curve_allow_dir) if config.curve_key_file else None
        self.is_draining = False
        self.ready = asyncio.Event()
        self.peers: dict[str, PeerLoad] = {}
        self.is_registry_stale = False
        self.http_url = ""
        self.steal_endpoint = ""
        self.result_endpoint = ""
        self.address_warning = ""  # why peers on other hosts cannot reach us (addresses.py); "" when they can
        self.containment = Containment(self.stats)
        self._seq = 0
        self._handles: dict[str, Handle] = {}
        self._ctx = zmq.asyncio.Context()
        self._drops = DropLog(self.stats)
        self._sender = Sender(self.stats)
        self._queued_send_bytes = 0
        self._steals = SentSteals(self.stats)  # thief: steals sent, by id (steals.py)
        self._grants = GrantCache(self.stats)  # victim: answers to repeated steal ids (steals.py)
        self._links = PeerLinks(self._ctx, self.node_id, self._drops, self._sender, self.containment, self._steals,
                                self._on_grant, self._on_load, self._on_origin_message, self.curve)
        self._steal_sock = make_socket(self._ctx, zmq.ROUTER)
        self._result_sock = make_socket(self._ctx, zmq.ROUTER)
        self._known_keys: OrderedDict[str, str] = OrderedDict()
        self._routes: OrderedDict[str, bytes] = OrderedDict()  # CurveZMQ: node id -> result routing id
        self._allowed_keys = self.curve.allowed_keys() if self.curve else frozenset()
        self._bad_records = OncePerMinute()
        self._rng = random.Random()
        self.balancer = Balancer(self.node_id, self._rng, min_queue=config.scheduler.min_load_score)
        self._records: dict[str, NodeRecord] = {}  # the registry's members, as last read
        self._suspects: set[str] = set()  # peers that stopped answering: their records are read again
        self._unanswered: dict[str, int] = {}  # peer -> probes sent since its last report
        self._recheck_turn = 0
        self._wake_stealer = asyncio.Event()
        self._refresh_soon = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._registry: Registry | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._http: HttpServer | None = None

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

    @property
    def queued_send_bytes(self) -> int:
        return self._queued_send_bytes

    @property
    def is_engine_stalled(self) -> bool:
        """The engine has been inside one step for longer than a lease timeout."""
        return self.engine.busy_for() > self.config.scheduler.lease_timeout

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(self.config.model_name, self.engine.model_id, self.engine.limits, self.config.max_tokens_cap,
                         int(self.started_at))

    @property
    def max_concurrent_requests(self) -> int:
        return self.config.max_concurrent_requests

    def note_rejected(self) -> None:
        self.stats.rejected += 1

    def snapshot(self) -> NodeSnapshot:
        scheduler = self.scheduler
        return NodeSnapshot(
            self.node_id, self.name, self.engine.model_id, self.is_draining, self.is_registry_stale,
            self.is_engine_stalled, self.curve.public_key if self.curve else "", self.steal_endpoint,
            self.result_endpoint, sorted(p.name for p in self.peers.values()), scheduler.load(),
            copy.deepcopy(self.stats), self.engine.stats, self.engine.pid, len(self._handles),
            self._queued_send_bytes, len(scheduler.leases), len(scheduler.remote), len(scheduler.requests),
            self.engine.limits.max_kv_tokens)

    def request_stop(self) -> None:
        self._stop_requested.set()

    def add_static_peer(self, peer: PeerLoad) -> None:
        """Treat ``peer`` as registered without a registry (``--scheduler-name local`` nodes in
        benchmarks): its steals are served and, with CurveZMQ, its published key is the one it
        must connect with. A global node's registry refresh replaces the table."""
        self.peers[peer.node_id] = peer
        self._known_keys[peer.node_id] = peer.public_key

    # ---- life cycle ----

    async def open(self) -> None:
        """Bind every socket and connect the engine process. A port in use, an address this host
        does not have, or a key ZeroMQ refuses is a ``ConfigError`` naming it, with nothing left open."""
        cfg = self.config
        try:
            if self.curve is not None:
                self._auth = self.curve.start_authenticator(self._ctx)
                self.curve.make_server(self._steal_sock)
                self.curve.make_server(self._result_sock)
            steal_port = self._bind(self._steal_sock, "steal", cfg.steal_port)
            result_port = self._bind(self._result_sock, "result", cfg.result_port)
            advertised = advertised_host(cfg)
            self.address_warning = advertised.warning
            if advertised.warning:
                log.warning("*** this node %s ***", advertised.warning)
            self.steal_endpoint = f"tcp://{advertised.host}:{cfg.advertise_steal_port or steal_port}"
            self.result_endpoint = f"tcp://{advertised.host}:{cfg.advertise_result_port or result_port}"
            http = HttpServer(self)
            self._http = http
            try:
                self.http_url = await http.start(cfg.host, cfg.port, advertised.host, cfg.metrics_port)
            except OSError as exc:
                raise ConfigError(f"cannot serve HTTP on {cfg.host} port {cfg.port}"
                                  f"{'' if cfg.metrics_port is None else f' / metrics {cfg.metrics_port}'}: "
                                  f"{exc.strerror or exc}") from None
            self.engine.open(self._ctx, self._on_engine_outputs)
        except BaseException:
            await self._close()
            raise
        warn_if_open(cfg.host, self.curve)

    def _bind(self, sock: zmq.asyncio.Socket, what: str, port: int) -> int:
        try:
            return bind(sock, self.config.host, port)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind the ZeroMQ {what} socket on {self.config.host}"
                              f"{f' port {port}' if port else ''}: {exc.strerror}") from None

    async def run(self) -> None:
        await self.open()
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass
        if cfg.engine == "sim" and cfg.sim.stall_s > 0:  # fault injection for the chaos suite
            loop.add_signal_handler(signal.SIGUSR1, self.engine.stall, cfg.sim.stall_s)
        try:
            async with asyncio.TaskGroup() as group:
                self._links.start(group)
                group.create_task(self._steal_server(), name="steal-server")
                group.create_task(self._result_server(), name="result-server")
                group.create_task(self._ticker(), name="ticker")
                group.create_task(self.engine.read_steps(), name="engine-steps")
                group.create_task(self._watch_engine(), name="engine-watch")
                if cfg.scheduler.is_global:
                    self._registry = Registry(cfg.scheduler)
                    await self._register_first()  # "up" (and /health 200) means listed in the registry
                    group.create_task(self._registry_loop(), name="registry")
                    group.create_task(self._stealer(), name="stealer")
                    group.create_task(self._prober(), name="prober")
                group.create_task(self._shutdown(), name="shutdown")
                log.info("node %s (%s) up: http %s steal %s result %s scheduler=%s model=%s curve=%s", self.name,
                         self.node_id, self.http_url, self.steal_endpoint, self.result_endpoint,
                         cfg.scheduler.name, self.engine.model_id, "on" if self.curve else "off")
                self.ready.set()
        except* _Shutdown:
            pass
        finally:
            await self._close()
        log.info("node %s stopped", self.name)

    async def _close(self) -> None:
        if self._http is not None:
            await self._http.stop()
        await self.engine.close()  # lets the engine finish its step; kills it if it does not
        self._links.close()
        self._steal_sock.close(0)
        self._result_sock.close(0)
        if self._registry is not None:
            await self._registry.close()
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    async def _shutdown(self) -> None:
        await self._stop_requested.wait()
        log.info("draining: %d own and %d stolen-in requests in flight",
                 len(self._handles), len(self.scheduler.remote))
        self.is_draining = True
        # unstarted stolen work goes home now; its own queue stays grantable, so peers that still
        # see it (until their next read of the members) take what it would otherwise run last
        self.scheduler.is_draining = True
        self._apply(self.scheduler.hand_back_pending("draining"))
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
        engine = self.engine
        for event in fx.client:
            handle = self._handles.get(event.request_id)
            if handle is not None:
                handle.events.put_nowait(event)
        for engine_request in fx.engine_add:
            engine.add(engine_request)
        for request_id in fx.engine_abort:
            engine.abort(request_id)
        for origin_id, message in fx.to_origin:
            try:
                sent = self._links.send_to_origin(origin_id, message)
            except ProtocolError as exc:  # a message over the frame cap: the protocol recovers (gap, lease)
                log.error("not sent to origin %s: %s", origin_id, exc)
                sent = False
            if not sent:
                self.stats.sends_failed += 1
        for thief_id, message in fx.to_thief:
            if not self._send_router(self._result_sock, self._route(thief_id), message):
                self.stats.sends_failed += 1

    def _send_router(self, sock: zmq.asyncio.Socket, peer: bytes, message: Message | bytes) -> bool:
        if not peer:
            return False  # no connection of that node known (yet)
        try:
            body = message if isinstance(message, bytes) else encode(message)
        except ProtocolError as exc:
            log.error("not sent to %r: %s", peer[:64], exc)
            return False
        return self._sender.send(sock, [peer, body], peer)

    def _wake_stealer_if_idle(self) -> None:
        if self._can_steal():
            self._wake_stealer.set()

    def _can_steal(self) -> bool:
        """A free slot, a queue of its own or a slot that frees with the running step
        (``balance.py`` decides what, if anything, to take), not draining, and an engine that
        makes progress (a hung engine would only hold what it steals until the leases lapse,
        again and again)."""
        sched = self.scheduler
        return (sched.free_slots > 0 or bool(sched.pending) or sched.slots_freeing > 0) \
            and not self.is_draining and not self.is_engine_stalled

    def _on_engine_outputs(self, outputs: list[EngineOutput], busy_s: float) -> None:
        with self.containment.guard("engine-outputs"):
            self._apply(self.scheduler.on_engine_outputs(outputs, busy_s, time.time()))
            self._wake_stealer_if_idle()

    def _on_grant(self, grant: Grant) -> None:
        now = time.time()
        self.balancer.heard(grant.victim_id, grant.victim_grantable, grant.victim_oldest_waited_s, now)
        if grant.tasks:
            self._apply(self.scheduler.on_grant(grant, now))

    def _on_load(self, report: LoadReport) -> None:
        self._unanswered.pop(report.node_id, None)
        self.balancer.heard(report.node_id, report.grantable, report.oldest_waited_s, time.time())
        self._wake_stealer_if_idle()

    def _on_origin_message(self, message: Ack | HeartbeatAck | Cancel) -> None:
        now = time.time()
        if isinstance(message, Ack):
            self.scheduler.on_ack(message, now)
        elif isinstance(message, HeartbeatAck):
            self._apply(self.scheduler.on_heartbeat_ack(message, now))
        else:
            self._apply(self.scheduler.on_cancel(message, now))
        self._wake_stealer_if_idle()

    # ---- who may say what ----

    async def _recv(self, sock: zmq.asyncio.Socket) -> tuple[bytes, list[bytes], str | None]:
        """(routing id, body frames, CurveZMQ User-Id or None) of the next message."""
        if self.curve is None:
            frames = await sock.recv_multipart()
            return frames[0], frames[1:], None
        parts = await sock.recv_multipart(copy=False)
        user_id = parts[-1].get("User-Id") if parts else None
        return parts[0].bytes, [part.bytes for part in parts[1:]], user_id if isinstance(user_id, str) else None

    def _speaks_for(self, node_id: str, peer: bytes, user_id: str | None) -> str | None:
        """Why the sender on this connection may not speak for ``node_id``, or None.

        Without CurveZMQ the connection's routing id must be the node id. With it, routing ids
        are the ROUTER's own (clients do not choose them, so none can take over another's), and
        the connection's key must be the one ``node_id`` published and still be allowed."""
        if self.curve is None:
            return None if node_id.encode() == peer else "node id does not match the connection's routing id"
        if user_id is None or user_id not in self._allowed_keys:
            return "the connection's CurveZMQ key is no longer allowed"
        if self._known_keys.get(node_id) != user_id:
            return "node id does not match the connection's CurveZMQ key"
        self._routes[node_id] = peer
        self._routes.move_to_end(node_id)
        while len(self._routes) > KNOWN_KEYS:
            self._routes.popitem(last=False)
        return None

    def _route(self, node_id: str) -> bytes:
        """The result-socket routing id of a thief (with CurveZMQ, learned from its messages)."""
        return self._routes.get(node_id, b"") if self.curve is not None else node_id.encode()

    # ---- loops ----

    async def _steal_server(self) -> None:
        while True:
            peer, body, user_id = await self._recv(self._steal_sock)
            with self.containment.guard("steal-server", peer[:64]):
                message = self._drops.decode("steal", peer, body, (Steal, Probe))
                if isinstance(message, (Steal, Probe)):
                    reply = self._answer_steal_socket(message, peer, user_id)
                    if reply is not None:
                        self._send_router(self._steal_sock, peer, reply)

    def _answer_steal_socket(self, message: Steal | Probe, peer: bytes, user_id: str | None) -> bytes | None:
        problem = self._speaks_for(message.thief_id, peer, user_id)
        if problem is not None:
            self._drops.refuse("steal", peer, problem)
            return None
        if isinstance(message, Probe):
            if message.thief_id not in self.peers:  # not a member we know (yet): look again soon
                self._refresh_soon.set()
                return None
            load = self.scheduler.load()
            grantable, waited = self.scheduler.queue_report(time.time())
            return encode(LoadReport(PROTOCOL_VERSION, message.probe_id, self.node_id, load["pending"],
                                     load["pending_tokens"], load["running"], waited, grantable))
        cached = self._grants.replay(message.thief_id, message.steal_id)
        if cached is not None:
            return cached  # a repeated steal id gets the same grant
        if message.victim_id != self.node_id:  # meant for a process that had our ports before us
            return self.scheduler.refuse_steal(message, "wrong_node")[1]
        thief = self.peers.get(message.thief_id)
        if thief is None:  # not a registered peer of our topic (yet): look again soon; it will ask again
            grant, reply = self.scheduler.refuse_steal(message, "unknown_peer")
            self._refresh_soon.set()
        elif thief.model_id != self.engine.model_id:  # its record, not its claim, says what it runs
            grant, reply = self.scheduler.refuse_steal(message, "model_mismatch")
        else:
            grant, reply = self.scheduler.on_steal(message, time.time())
        self._grants.put(message.thief_id, message.steal_id, reply)
        if grant.tasks:
            log.info("granted %d request(s) to %s", len(grant.tasks), message.thief_name)
            self._wake_stealer_if_idle()  # our oldest is younger now: a peer's may be worth taking
        return reply

    async def _result_server(self) -> None:
        while True:
            peer, body, user_id = await self._recv(self._result_sock)
            with self.containment.guard("result-server", peer[:64]):
                message = self._drops.decode("result", peer, body, (Tokens, Heartbeat, Handback))
                if not isinstance(message, (Tokens, Heartbeat, Handback)):
                    continue
                problem = self._speaks_for(message.thief_id, peer, user_id)
                if problem is not None:
                    self._drops.refuse("result", peer, problem)
                    continue
                now = time.time()
                if isinstance(message, Tokens):
                    self._apply(self.scheduler.on_tokens(message, now))
                elif isinstance(message, Heartbeat):
                    self._apply(self.scheduler.on_heartbeat(message, now))
                else:
                    self._apply(self.scheduler.on_handback(message, now))
                    self._wake_stealer_if_idle()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            with self.containment.guard("ticker"):
                self._apply(self.scheduler.tick(time.time(), engine_ok=not self.is_engine_stalled))
                self._wake_stealer_if_idle()
                self._queued_send_bytes = self._sender.queued_bytes()

    async def _watch_engine(self) -> None:
        """The engine process died: fail every request (their clients get an error), leave the
        registry, and end the node (exit 1): a node without an engine must not look alive."""
        await self.engine.stopped.wait()
        failure = self.engine.failure
        if failure is None:
            return
        self.is_draining = True
        self.scheduler.is_accepting_steals = False
        self._apply(self.scheduler.on_engine_failure(str(failure)))
        deadline = time.monotonic() + ENGINE_FAILURE_GRACE_S
        while self._handles and time.monotonic() < deadline:  # let the HTTP handlers write the errors
            await asyncio.sleep(TICK_S)
        if self._registry is not None:
            try:
                await asyncio.wait_for(self._registry.deregister(self.node_id), ENGINE_FAILURE_GRACE_S)
            except (RegistryUnavailable, TimeoutError) as exc:
                log.warning("could not deregister after the engine failed (%s); the record will expire", exc)
        raise failure

    def _record(self) -> NodeRecord:
        load = self.scheduler.load()
        return NodeRecord(self.node_id, self.name, PROTOCOL_VERSION, self.engine.model_id, self.steal_endpoint,
                          self.result_endpoint, self.http_url, self.started_at, time.time(),
                          load["pending"], load["pending_tokens"], load["running"], load["free_slots"],
                          load["free_kv_tokens"], self.curve.public_key if self.curve else "", self.address_warning)

    async def _refresh_peers(self) -> None:
        """Read who the members are (``Registry.members``: the records of new members, of peers
        that stopped answering, and of one more in turn); keep the records a peer can use and
        connect to new peers early (so the first steal does not wait for a handshake). Bad records
        are counted and skipped. Loads are not read here: peers report their queues themselves."""
        assert self._registry is not None
        known = {node_id: record for node_id, record in self._records.items() if node_id not in self._suspects}
        # one known record in turn, picked at random so that nodes started together spread their reads
        turn = [self._rng.choice(sorted(known))] if known and self._recheck_turn % RECHECK_EVERY == 0 else []
        self._recheck_turn += 1
        suspects, self._suspects = self._suspects, set()
        try:
            records = await self._registry.members(known, suspects | set(turn))
        except BaseException:
            self._suspects |= suspects  # read them next time
            raise
        self._records = records
        if self.curve is not None and self._auth is not None:  # keys added or revoked while we run
            self.curve.reload_allow_list(self._auth)
            self._allowed_keys = self.curve.allowed_keys()
        peers: dict[str, PeerLoad] = {}
        for record in records.values():
            if record.node_id == self.node_id or record.version != PROTOCOL_VERSION:
                continue
            if record.steal_endpoint == self.steal_endpoint:  # our predecessor on these ports, not yet expired
                continue
            problem = record.problem()
            if problem is None and self.curve is not None and record.public_key not in self._allowed_keys:
                problem = "its CurveZMQ public key is missing or not in --curve-allow-dir"
            if problem is None:
                peer = record.as_peer()
                if peer.model_id == self.engine.model_id:
                    try:
                        self._links.link(peer)
                    except (zmq.ZMQError, ValueError) as exc:
                        problem = f"cannot connect: {exc}"
            if problem is not None:
                self.stats.bad_peer_records += 1
                if self._bad_records.should_log(record.node_id[:64]):
                    log.warning("skipping registry record of %r (%s): %s", record.name[:64], record.node_id[:64],
                                problem)
                continue
            peers[record.node_id] = peer
            self._known_keys[record.node_id] = record.public_key
            self._known_keys.move_to_end(record.node_id)
        while len(self._known_keys) > KNOWN_KEYS:
            self._known_keys.popitem(last=False)
        self.peers = peers
        self._unanswered = {node_id: n for node_id, n in self._unanswered.items() if node_id in peers}
        self.balancer.set_members(p.node_id for p in peers.values() if p.model_id == self.engine.model_id)
        self._links.prune(set(peers) | self.scheduler.remote.origins())

    async def _register_first(self) -> None:
        assert self._registry is not None
        try:
            await self._registry.heartbeat(self._record())
        except RegistryUnavailable as exc:  # start anyway; the registry loop keeps trying
            self.stats.registry_errors += 1
            self.is_registry_stale = True
            log.warning("registry unavailable at start (%s): serving alone until it is back", exc)

    async def _registry_loop(self) -> None:
        """Every heartbeat interval: write our record (and load, for operators); every
        ``MEMBERS_EVERY`` heartbeats read who the members are. Sooner, at most every
        ``PEER_REFRESH_MIN_GAP_S`` and without a heartbeat, when an unknown peer calls (it may
        have just joined) or a peer stopped answering. About 4.6 commands a second per node as
        ``INFO commandstats`` counts them (the heartbeat script is 4), whatever the cluster's
        size or load."""
        assert self._registry is not None
        interval = self.config.scheduler.heartbeat_interval
        heartbeats = 0
        next_heartbeat = time.monotonic()
        while not self.is_draining:
            try:
                read_members = bool(self._suspects) or self._refresh_soon.is_set()
                heartbeat = time.monotonic() >= next_heartbeat
                if heartbeat:
                    next_heartbeat = time.monotonic() + interval
                    await self._registry.heartbeat(self._record())
                    read_members = read_members or heartbeats % MEMBERS_EVERY == 0
                    heartbeats += 1
                if read_members:
                    self._refresh_soon.clear()
                    await self._refresh_peers()
                if heartbeat or read_members:  # a timer that fired early sent nothing: it proves nothing
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
            except Exception as exc:  # noqa: BLE001 - what Redis returned made no sense: count it, go on
                self.containment.record("registry", "redis", exc)
            try:
                await asyncio.wait_for(self._refresh_soon.wait(), max(0.0, next_heartbeat - time.monotonic()))
                await asyncio.sleep(PEER_REFRESH_MIN_GAP_S)  # (and while Redis is down, no faster than this)
            except TimeoutError:
                pass

    async def _prober(self) -> None:
        """Every probe interval, while this node could steal (a free slot, or a queue of its
        own), ask a few random peers how their queues look (``balance.py``); the answers arrive
        through ``_on_load``. Nobody waits for them."""
        while not self.is_draining:
            await asyncio.sleep(PROBE_INTERVAL_S)
            with self.containment.guard("prober"):
                if not self._can_steal():
                    continue
                for node_id in self.balancer.probe_targets():
                    peer = self.peers.get(node_id)
                    if peer is None:
                        continue
                    self.stats.probes_sent += 1
                    self._links.send_probe(peer, Probe(PROTOCOL_VERSION, uuid.uuid4().hex, self.node_id))
                    unanswered = self._unanswered.get(node_id, 0) + 1
                    self._unanswered[node_id] = unanswered
                    if unanswered >= SUSPECT_AFTER_PROBES:  # gone without deregistering? its record says
                        del self._unanswered[node_id]
                        self._suspects.add(node_id)

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
            with self.containment.guard("stealer"):
                await self._steal_round()

    async def _steal_round(self) -> None:
        """Steal while the balancer says a peer holds older work than we do (``balance.py``):
        one steal in flight at a time, each sized by what this node can take now."""
        cfg = self.config.scheduler
        while self._can_steal():
            plan = self.scheduler.plan_steal(self.balancer, time.time())
            if plan is None:
                return
            victim = self.peers.get(plan.victim_id)
            if victim is None:
                self.balancer.lost(plan.victim_id)
                continue
            self.stats.steals_attempted += 1
            steal = Steal(PROTOCOL_VERSION, uuid.uuid4().hex, victim.node_id, self.node_id, self.name,
                          self.engine.model_id, min(plan.max_requests, MAX_TASKS_PER_GRANT),
                          min(plan.max_tokens, MAX_COUNT), self.engine.limits.max_model_len, plan.min_waited_s)
            grant = await self._links.steal(victim, steal, cfg.steal_timeout)
            if grant is None:
                self.stats.steals_timed_out += 1
                self.balancer.lost(victim.node_id)
                self._suspects.add(victim.node_id)
                continue
            if grant.reason == "wrong_node":  # the peer restarted; its ports have a new owner
                self.stats.steals_wrong_node += 1
                self.peers.pop(victim.node_id, None)
                self.balancer.lost(victim.node_id)
                self._suspects.add(victim.node_id)
                self._refresh_soon.set()
                continue
            # fruitless too when every task went straight back (our queue filled meanwhile, say)
            taken = any(task.request_id in self.scheduler.requests for task in grant.tasks)
            self.balancer.granted(victim.node_id, fruitless=not taken, now=time.time())
            if grant.tasks:
                self.stats.steals_granted += 1
            else:
                self.stats.steals_empty += 1

