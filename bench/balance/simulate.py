"""A discrete-event simulator of a cluster, driving the project's own core on a virtual clock.

Each simulated node holds a real ``Scheduler`` (queues, admission, leases, grants, token
streams, resume), a real ``Balancer`` (whom to steal from, and what) and a real ``SimEngine``
whose steps are charged their cost model's time instead of sleeping. What the node process does
around them is mirrored here: the engine takes adds and aborts between steps; messages between
nodes go through a simulated network (one-way latency, optional loss; as objects: the wire
format is tested elsewhere); every heartbeat a node writes its record and reads who the members
are; while it could steal (a free slot, or a queue of its own) it probes a few random peers
every probe interval; its stealer wakes on every report, grant and step and sends one steal at
a time while the balancer names a peer with older work; a ticker runs the scheduler's timers.
The timing constants are the node's own (``p2psched.node``).

Modes, all on the same items:

- ``local``: no stealing; each node serves what the front door gave it.
- ``global``: p2psched's work stealing, as the node does it.
- ``fastdeploy``: FastDeploy's Redis global scheduler (``fastdeploy.py``, ``SimFastDeploy``): the
  lists and the load set held here, every command charged a Redis round trip and counted as
  ``INFO commandstats`` counts the real one's.
- ``oracle``: one central queue that hands each request, in arrival order, to a node the moment
  one has a free slot (late binding, no network): the bar for waiting time.

Membership changes (``ClusterSpec.joins`` and ``leaves``, on the items' clock): a joining node
does not exist before its time; then it starts as every node did at warm-up (registers, reads the
members, starts its loops). Peers learn of it at their next member read, or half a second after
it first calls them (they answer no probe and grant no steal to a node they do not know, as
``p2psched.node`` does). A leaving node drains as ``Node._shutdown`` does: it grants nothing more,
hands unstarted stolen tasks back, stops probing and stealing, deregisters (peers drop it at their
next member read), finishes what it holds and exits. Clients of a node that has not joined yet
wait for it (as the harness's do).

Where each request's wait went is recorded as it happens (``WaitRecord``, on ``RunResult.waits``):
for a stolen request, how long it sat before any peer heard of it, the thief's decision, the steal's
round trip and what followed on the thief; for every request, how much of its wait passed while
some node had a free slot. ``waits.decompose`` summarises them (``--decompose``).

Hundreds of nodes and thousands of requests run in seconds (``python -m bench.balance.simulate``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import itertools
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from p2psched import PROTOCOL_VERSION
from p2psched.core.balance import Balancer
from p2psched.core.config import SimEngineConfig
from p2psched.core.engine import EngineOutput, EngineRequest, StepResult
from p2psched.core.protocol import (
    MAX_COUNT,
    MAX_TASKS_PER_GRANT,
    Ack,
    Cancel,
    Grant,
    Handback,
    Heartbeat,
    HeartbeatAck,
    Message,
    Sampling,
    Steal,
    Tokens,
)
from p2psched.core.scheduler import Effects, Scheduler, SchedulerParams
from p2psched.node import (
    MEMBERS_EVERY,
    PEER_REFRESH_MIN_GAP_S,
    PROBE_INTERVAL_S,
    RECHECK_EVERY,
    TICK_S,
)
from p2psched.sim_engine import SimEngine

from . import fastdeploy as fd
from .metrics import RequestRecord, summarize
from .waits import WaitRecord, decompose, format_decomposition
from .workload import Item, WorkloadSpec, generate, prompt_ids, sim_capacity_rps

Mode = Literal["local", "global", "fastdeploy", "oracle"]
MODES: tuple[Mode, ...] = ("local", "global", "fastdeploy", "oracle")
MODEL = "sim"
WARM_UP_S = 3.0  # nodes run (registered, every member read twice) this long before the first request


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 4
    max_num_seqs: int = 8
    # the harness's node flags (--sim-*), with the sim engine's default KV size and context length
    cost: SimEngineConfig = SimEngineConfig(decode_step_ms=20.0, decode_ms_per_seq=0.0, decode_ms_per_kilotoken=0.0,
                                            prefill_ms_per_token=0.0)
    slowdowns: tuple[float, ...] = ()  # per node: its steps take this many times longer (default 1)
    latency_s: float = 0.0005  # one way, node to node
    loss: float = 0.0  # share of node-to-node messages lost
    redis_latency_s: float = 0.0005  # one way
    min_load_score: int = 1
    heartbeat_interval: float = 1.0
    steal_timeout: float = 0.25
    margin_s: float = 0.1  # a busy node steals requests older than its own oldest by this much (ends unannounced)
    freeing_margin_s: float = 0.0  # ... by this much when one of its slots frees with the running step
    announced_margin_s: float = 0.3  # ... by this much otherwise, when its requests' ends are announced
    # outputs end on end-of-sequence: each request asks for EOS_MAX_TOKENS and stops, unannounced,
    # after its item's length (``max_tokens`` no longer tells a scheduler when a slot frees)
    eos: bool = False
    fanout: int = 3  # peers probed per probe round
    lease_timeout: float = 3.0
    ttl: float = 900.0
    seed: int = 0
    # membership changes, (node index, seconds on the items' clock): a joiner does not exist before
    # its time (``nodes`` counts it); a leaver drains from its time on, as on SIGTERM
    joins: tuple[tuple[int, float], ...] = ()
    leaves: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name, changes in (("joins", self.joins), ("leaves", self.leaves)):
            nodes = [n for n, _ in changes]
            if len(set(nodes)) != len(nodes) or not all(0 <= n < self.nodes and 0 <= t < math.inf for n, t in changes):
                raise ValueError(f"{name}: (node, time) pairs, each node at most once, nodes in 0..{self.nodes - 1}, "
                                 f"times >= 0")
        joined = dict(self.joins)
        if any(n in joined and t <= joined[n] for n, t in self.leaves):
            raise ValueError("a node leaves after it joins")
        if len(self.leaves) >= self.nodes:
            raise ValueError("at least one node must stay")

    def slowdown(self, n: int) -> float:
        return self.slowdowns[n] if n < len(self.slowdowns) else 1.0

    def join_time(self, n: int) -> float | None:
        return next((t for node, t in self.joins if node == n), None)

    def leave_time(self, n: int) -> float | None:
        return next((t for node, t in self.leaves if node == n), None)


class Loop:
    """The virtual clock: callbacks in time order (ties in the order they were scheduled)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._order), callback))

    def after(self, delay: float, callback: Callable[[], None]) -> None:
        self.at(self.now + delay, callback)

    def run(self, until: Callable[[], bool], horizon: float) -> None:
        while self._queue and not until():
            when, _, callback = heapq.heappop(self._queue)
            if when > horizon:
                break
            self.now = when
            callback()


@dataclass
class Counters:
    redis_commands: int = 0
    steals: int = 0
    steals_granted: int = 0
    tasks_stolen: int = 0
    probes: int = 0
    messages: int = 0
    messages_lost: int = 0
    steal_round_trips: list[float] = field(default_factory=list)


@dataclass
class NodeStats:
    """One node's life in a run (times on the items' clock; None: never)."""

    joined_s: float | None = None  # None: there from the start
    left_s: float | None = None  # began to drain
    gone_s: float | None = None  # exited, with nothing left to finish
    probes_sent: int = 0
    first_probe_s: float | None = None
    last_probe_s: float | None = None
    first_probed_s: float | None = None  # the first probe a peer sent it
    last_probed_s: float | None = None  # ... and the last
    steals_sent: int = 0
    first_steal_s: float | None = None
    last_steal_s: float | None = None


@dataclass(slots=True)
class _Trace:
    """What the simulator saw of one request, as it happened (``WaitRecord`` is made from it)."""

    idle_at_arrival: float = 0.0  # the cluster's idle-slot clock (``SimCluster.idle_clock``) then
    admitted_s: float | None = None  # into a slot (the scheduler's running set), before its first step
    idle_at_admission: float = 0.0
    step_s: float | None = None  # the step that produced its first token started
    engine_token_s: float | None = None  # ... and ended
    ran_on: str = ""
    noticed_s: float | None = None  # a peer first heard a report of its origin's queue made after it arrived
    steal_sent_s: float | None = None  # the steal that took it (the last, had it been handed back)
    grant_s: float | None = None  # the thief received that grant
    grant_size: int = 0
    thief: str = ""


EOS_MAX_TOKENS = 1024  # what each request asks for when outputs end on EOS (``ClusterSpec.eos``)


class _EosSimEngine(SimEngine):
    """The sim engine, but a request ends (``stop``) after its item's length: an EOS no scheduler
    saw coming."""

    def __init__(self, config: SimEngineConfig, max_num_seqs: int, lengths: dict[str, int]):
        super().__init__(config, max_num_seqs)
        self._lengths = lengths

    def advance(self) -> StepResult:
        result = super().advance()
        for i, out in enumerate(result.outputs):
            seq = self._seqs.get(out.request_id)
            if out.finish_reason is None and seq is not None and len(seq.output) >= self._lengths[out.request_id]:
                del self._seqs[out.request_id]
                result.outputs[i] = EngineOutput(out.request_id, out.new_token_ids, "stop")
        return result


class SimNode:
    """One node: its scheduler and engine, and the loops of ``p2psched.node`` around them."""

    def __init__(self, cluster: SimCluster, index: int):
        spec = cluster.spec
        self.cluster = cluster
        self.loop = cluster.loop
        self.index = index
        self.node_id = f"node{index}"
        self.engine = _EosSimEngine(spec.cost, spec.max_num_seqs, cluster.lengths) if spec.eos \
            else SimEngine(spec.cost, spec.max_num_seqs)
        limits = self.engine.limits
        self.sched = Scheduler(SchedulerParams(self.node_id, self.node_id, MODEL, limits, spec.ttl,
                                               spec.lease_timeout, max_queue_len=1 << 30))
        self.slowdown = spec.slowdown(index)
        self.inbox: list[EngineRequest | str] = []  # adds and aborts for the engine's next step
        self.is_stepping = False
        self.busy_s = 0.0
        # stealing (global mode)
        self.balancer = Balancer(self.node_id, random.Random(spec.seed * 1000 + index), margin_s=spec.margin_s,
                                 fanout=spec.fanout, min_queue=spec.min_load_score,
                                 freeing_margin_s=spec.freeing_margin_s, announced_margin_s=spec.announced_margin_s)
        self.known: set[str] = set()  # the members as last read (ourselves too)
        self.heartbeats = 0
        self.member_reads = 0
        self.is_refresh_due = False  # an unknown peer called: the members are read again soon
        self.in_round = False
        self.round_scheduled = False
        # membership
        self.stats = NodeStats(joined_s=spec.join_time(index))
        self.is_joined = self.stats.joined_s is None
        self.is_draining = False
        self.is_gone = False
        self.held: list[Item] = []  # requests whose clients wait for this node to join
        # wait accounting (``SimCluster``): counted among the nodes with a free slot; own requests
        # submitted, and those no peer has heard of yet as (submitted before them, item index)
        self.has_free_slot = False
        self.num_submitted = 0
        self.unnoticed: deque[tuple[int, int]] = deque()

    @property
    def is_live(self) -> bool:
        """Joined and not draining: takes new work."""
        return self.is_joined and not self.is_draining

    # ---- engine ----

    def apply(self, fx: Effects) -> None:
        cluster = self.cluster
        for event in fx.client:
            cluster.on_client_event(self, event)
        if fx.engine_add or fx.engine_abort:
            self.inbox += fx.engine_add
            self.inbox += fx.engine_abort
            self._kick()
        for dest, message in fx.to_origin:
            cluster.send(self, dest, message)
        for dest, message in fx.to_thief:
            cluster.send(self, dest, message)
        for request in fx.engine_add:
            cluster.note_admitted(request.request_id)
        cluster.note_slots(self)
        if cluster.is_stealing:
            self.wake_stealer()

    def _kick(self) -> None:
        if not self.is_stepping:
            self.is_stepping = True
            self.loop.after(0.0, self._start_step)

    def _start_step(self) -> None:
        inbox, self.inbox = self.inbox, []
        for op in inbox:
            if isinstance(op, str):
                self.engine.abort(op)
            else:
                self.engine.add(op)
        if not self.engine.has_work():
            self.is_stepping = False
            return
        cost = self.engine.step_cost_s() * self.slowdown
        if inbox:
            self.cluster.note_steps(self, inbox, cost)
        self.loop.after(cost, lambda: self._end_step(cost))

    def _end_step(self, cost: float) -> None:
        result = self.engine.advance()
        self.busy_s += cost
        self.apply(self.sched.on_engine_outputs(result.outputs, cost, self.loop.now))
        self.cluster.after_step(self)
        self._start_step()

    # ---- ticker ----

    def tick(self) -> None:
        """The ticker; a draining node exits once it holds nothing (``Node._shutdown``)."""
        self.apply(self.sched.tick(self.loop.now))
        if self.is_draining and not self.sched.requests and not len(self.sched.remote):
            self.is_gone = True
            self.stats.gone_s = self.loop.now
            return
        self.loop.after(TICK_S, self.tick)

    # ---- registry: membership only ----

    def heartbeat_loop(self) -> None:
        """Every heartbeat: write our record; every ``MEMBERS_EVERY``: read the member list, the
        records of members not seen before, and one more in turn now and then, as the node does.
        The loop ends when the node drains."""
        if self.is_draining:
            return
        cluster = self.cluster
        cluster.registry.add(self.node_id)
        commands = 4  # the heartbeat script, as INFO commandstats counts it (EVALSHA, HSET, PEXPIRE, ZADD)
        if self.heartbeats % MEMBERS_EVERY == 0:
            commands += self._read_members()
        self.heartbeats += 1
        if self.loop.now >= 0:  # commands while serving; each node's first read of the table is at start
            cluster.counters.redis_commands += commands
        self.loop.after(2 * cluster.spec.redis_latency_s, self._members_read)
        self.loop.after(cluster.spec.heartbeat_interval, self.heartbeat_loop)

    def _read_members(self) -> int:
        """Read who the members are (a deregistered node is gone from the list); the commands."""
        members = set(self.cluster.registry)
        commands = 1 + len(members - self.known - {self.node_id})  # ZREVRANGE, HGETALL per new member
        commands += 1 if self.member_reads % RECHECK_EVERY == 0 else 0  # one re-read in turn
        self.member_reads += 1
        self.known = members
        self.is_refresh_due = False
        return commands

    def _members_read(self) -> None:
        self.balancer.set_members(self.known)
        self.wake_stealer()

    def refresh_soon(self) -> None:
        """A peer we do not know called (it may have just joined): read the members again
        ``PEER_REFRESH_MIN_GAP_S`` from now, without a heartbeat, as the node's registry loop does."""
        if self.is_refresh_due or self.is_draining:
            return
        self.is_refresh_due = True

        def refresh() -> None:
            if not self.is_refresh_due or self.is_draining:
                return  # a heartbeat's read came first
            commands = self._read_members()
            if self.loop.now >= 0:
                self.cluster.counters.redis_commands += commands
            self.loop.after(2 * self.cluster.spec.redis_latency_s, self._members_read)

        self.loop.after(PEER_REFRESH_MIN_GAP_S, refresh)

    def knows(self, peer: SimNode) -> bool:
        """Whether we answer ``peer``'s probes and serve its steals: it was a member when we last
        read (the node's ``self.peers``). During the warm-up nodes starting a tick apart answer
        each other at once, as before membership changes were simulated (by time 0 every node has
        read the whole table twice, so this only matters for joiners)."""
        return peer.node_id in self.known or self.loop.now < 0

    # ---- probes: what the peers' queues look like ----

    def probe_loop(self) -> None:
        """As the node: only a node that could steal (a free slot, a queue, or a slot that frees with
        the running step) asks; not once it drains."""
        if self.is_draining:
            return
        cluster = self.cluster
        if self.sched.free_slots > 0 or self.sched.pending or self.sched.slots_freeing > 0:
            for peer_id in self.balancer.probe_targets():
                cluster.probe(self, cluster.nodes[peer_id])
        self.loop.after(PROBE_INTERVAL_S, self.probe_loop)

    def heard(self, node_id: str, grantable: int, oldest_waited_s: float, num_submitted: int) -> None:
        """A probe's answer: ``num_submitted``, the requests its node had been given when it answered."""
        self.balancer.heard(node_id, grantable, oldest_waited_s, self.loop.now)
        self.cluster.note_report(node_id, grantable, num_submitted)
        self.wake_stealer()

    # ---- stealer ----

    def wake_stealer(self) -> None:
        if not self.in_round and not self.round_scheduled:
            self.round_scheduled = True
            self.loop.after(0.0, self._round)

    def _round(self) -> None:
        self.round_scheduled = False
        if self.in_round or self.is_draining:
            return
        plan = self.sched.plan_steal(self.balancer, self.loop.now)
        if plan is None:
            return
        self.in_round = True
        cluster = self.cluster
        steal = Steal(PROTOCOL_VERSION, f"{self.node_id}-{next(cluster.ids)}", plan.victim_id, self.node_id,
                      self.node_id, MODEL, min(plan.max_requests, MAX_TASKS_PER_GRANT),
                      min(plan.max_tokens, MAX_COUNT), self.engine.limits.max_model_len, plan.min_waited_s)
        cluster.counters.steals += 1
        sent_at = self.loop.now
        stats = self.stats
        stats.steals_sent += 1
        stats.first_steal_s = sent_at if stats.first_steal_s is None else stats.first_steal_s
        stats.last_steal_s = sent_at
        answered = [False]

        def on_grant(grant: Grant, num_submitted: int) -> None:
            # what the node's _on_grant does with every grant, late or not
            self.balancer.heard(plan.victim_id, grant.victim_grantable, grant.victim_oldest_waited_s, self.loop.now)
            cluster.note_report(plan.victim_id, grant.victim_grantable, num_submitted)
            if grant.tasks:
                self.apply(self.sched.on_grant(grant, self.loop.now))
                for task in grant.tasks:
                    if task.request_id in self.sched.requests:  # taken, not handed straight back
                        cluster.note_stolen(task.request_id, self, sent_at, len(grant.tasks))
            if answered[0]:
                return  # late: the round moved on
            answered[0] = True
            cluster.counters.steal_round_trips.append(self.loop.now - sent_at)
            taken = any(task.request_id in self.sched.requests for task in grant.tasks)
            self.balancer.granted(plan.victim_id, fruitless=not taken, now=self.loop.now)
            if grant.tasks:
                cluster.counters.steals_granted += 1
                cluster.counters.tasks_stolen += len(grant.tasks)
            self.in_round = False
            self.wake_stealer()

        def on_timeout() -> None:
            if not answered[0]:
                answered[0] = True
                self.balancer.lost(plan.victim_id)
                self.in_round = False
                self.wake_stealer()

        cluster.rpc(self, cluster.nodes[plan.victim_id], steal, on_grant)
        self.loop.after(cluster.spec.steal_timeout, on_timeout)


class SimCluster:
    def __init__(self, spec: ClusterSpec, mode: Mode, items: list[Item]):
        self.spec = spec
        self.mode = mode
        self.loop = Loop(-WARM_UP_S)
        self.counters = Counters()
        self.rng = random.Random(spec.seed)
        self.ids = itertools.count()
        self.registry: set[str] = set()
        self.lengths = {str(item.index): item.max_tokens for item in items}  # outputs, when they end on EOS
        self.node_list = [SimNode(self, n) for n in range(spec.nodes)]
        self.nodes = {node.node_id: node for node in self.node_list}
        self.items = items
        self.records = {item.index: RequestRecord(item.index, item.arrival_s, f"node{item.node}") for item in items}
        self.traces = {item.index: _Trace() for item in items}
        self.finished = 0
        self.central: list[Item] = []  # oracle's queue (arrival order)
        self._central_head = 0
        self.fd = SimFastDeploy(self) if mode == "fastdeploy" else None
        # the idle-slot clock: seconds so far during which some live node had a free slot
        self.num_free_nodes = 0
        self._idle_total = 0.0
        self._idle_since = self.loop.now
        for node in self.node_list:
            self.note_slots(node)

    @property
    def is_stealing(self) -> bool:
        return self.mode == "global"

    # ---- network ----

    def send(self, src: SimNode, dest_id: str, message: Message) -> None:
        dest = self.nodes.get(dest_id)
        if dest is None or not dest.is_joined:
            return
        self.counters.messages += 1
        if self.spec.loss and self.rng.random() < self.spec.loss:
            self.counters.messages_lost += 1
            return
        self.loop.after(self.spec.latency_s, lambda: self._deliver(dest, message))

    def _deliver(self, dest: SimNode, message: Message) -> None:
        if dest.is_gone:
            return  # its sockets are closed
        sched, now = dest.sched, self.loop.now
        if isinstance(message, Tokens):
            dest.apply(sched.on_tokens(message, now))
        elif isinstance(message, Heartbeat):
            dest.apply(sched.on_heartbeat(message, now))
        elif isinstance(message, Handback):
            dest.apply(sched.on_handback(message, now))
        elif isinstance(message, HeartbeatAck):
            dest.apply(sched.on_heartbeat_ack(message, now))
        elif isinstance(message, Cancel):
            dest.apply(sched.on_cancel(message, now))
        elif isinstance(message, Ack):
            sched.on_ack(message, now)

    def rpc(self, thief: SimNode, victim: SimNode, steal: Steal, on_grant: Callable[[Grant, int], None]) -> None:
        """Steal -> Grant, one round trip; ``on_grant`` also gets the requests the victim had been
        given when it answered (for ``note_report``). A victim that exited does not answer; one that
        does not know the thief refuses it and reads the members soon (``Node._answer_steal_socket``)."""
        lost = self.spec.loss and self.rng.random() < self.spec.loss
        self.counters.messages += 1
        if lost:
            self.counters.messages_lost += 1
            return

        def at_victim() -> None:
            if victim.is_gone:
                return
            if victim.knows(thief):
                grant, _ = victim.sched.on_steal(steal, self.loop.now)
            else:
                grant, _ = victim.sched.refuse_steal(steal, "unknown_peer")
                victim.refresh_soon()
            if grant.tasks:
                victim.wake_stealer()  # as the node does: its oldest is younger now
                self.note_slots(victim)
            self.counters.messages += 1
            if self.spec.loss and self.rng.random() < self.spec.loss:
                self.counters.messages_lost += 1
                return
            num_submitted = victim.num_submitted
            self.loop.after(self.spec.latency_s, lambda: on_grant(grant, num_submitted))

        self.loop.after(self.spec.latency_s, at_victim)

    def probe(self, src: SimNode, dest: SimNode) -> None:
        """Probe -> LoadReport, one round trip; a lost one says nothing (the view ages out)."""
        self.counters.probes += 1
        for _ in range(2):
            self.counters.messages += 1
            if self.spec.loss and self.rng.random() < self.spec.loss:
                self.counters.messages_lost += 1
                return

        src.stats.probes_sent += 1
        src.stats.first_probe_s = self.loop.now if src.stats.first_probe_s is None else src.stats.first_probe_s
        src.stats.last_probe_s = dest.stats.last_probed_s = self.loop.now
        dest.stats.first_probed_s = self.loop.now if dest.stats.first_probed_s is None else dest.stats.first_probed_s

        def at_dest() -> None:
            if dest.is_gone:
                return
            if not dest.knows(src):  # not a member it knows (yet): no answer, and it looks again soon
                dest.refresh_soon()
                return
            grantable, waited = dest.sched.queue_report(self.loop.now)
            num_submitted = dest.num_submitted
            self.loop.after(self.spec.latency_s, lambda: src.heard(dest.node_id, grantable, waited, num_submitted))

        self.loop.after(self.spec.latency_s, at_dest)

    # ---- clients ----

    def arrive(self, item: Item) -> None:
        self.traces[item.index].idle_at_arrival = self.idle_clock()
        self._enter(item)

    def _enter(self, item: Item) -> None:
        if self.mode == "oracle":
            self.central.append(item)
            self.dispatch()
            return
        node = self.node_list[item.node]
        if not node.is_joined:  # its client waits until the node is up (as the harness's does)
            node.held.append(item)
            return
        if node.is_draining:  # too late: the node refuses it (``Node.submit``)
            record = self.records[item.index]
            record.error = "503: the server is shutting down"
            self.finished += 1
            return
        if self.fd is not None:
            self.fd.put(item)
            return
        self._submit(node, item)

    def _submit(self, node: SimNode, item: Item, origin: str | None = None) -> None:
        self.records[item.index].origin = origin or node.node_id
        if self.is_stealing:  # (only its own: the other modes submit every request where it runs)
            node.unnoticed.append((node.num_submitted, item.index))
            node.num_submitted += 1
        node.sched.submit(str(item.index), prompt_ids(item, self.spec.cost.vocab_size),
                          Sampling(max_tokens=EOS_MAX_TOKENS if self.spec.eos else item.max_tokens, seed=item.seed),
                          self.loop.now)
        node.apply(node.sched.admit(self.loop.now))

    def dispatch(self) -> None:
        """Oracle: the queue's head to any live node with a free slot, until none has one."""
        while self._central_head < len(self.central):
            free = [n for n in self.node_list if n.sched.free_slots > 0 and not n.sched.pending and n.is_live]
            if not free:
                return
            node = max(free, key=lambda n: (n.sched.free_slots, -n.index))
            item = self.central[self._central_head]
            self._central_head += 1
            self._submit(node, item)

    def after_step(self, node: SimNode) -> None:
        if self.mode == "oracle":
            self.dispatch()
        elif self.fd is not None:
            self.fd.poll(node)

    def on_client_event(self, node: SimNode, event: Any) -> None:
        record = self.records[int(event.request_id)]
        if self.fd is not None and record.origin != node.node_id:  # relayed to its origin through Redis
            self.fd.relay(node, record.origin)
            self.loop.after(self.fd.relay_delay_s, lambda: self._record(record, event))
            return
        self._record(record, event)

    def _record(self, record: RequestRecord, event: Any) -> None:
        if event.token_ids:
            record.token_times.append(self.loop.now)
            record.num_tokens += len(event.token_ids)
        if event.served_by:
            record.served_by = event.served_by
        if event.error is not None:
            record.error = event.error
            self.finished += 1
        elif event.finish_reason is not None:
            record.finish_s = self.loop.now
            self.finished += 1

    # ---- membership ----

    def join(self, node: SimNode) -> None:
        """The node starts, as every node did at warm-up; then its waiting clients send."""
        node.is_joined = True
        self.note_slots(node)
        self._start(node, self.loop.now)
        held, node.held = node.held, []
        for item in held:
            self.loop.at(self.loop.now, functools.partial(self._enter, item))

    def leave(self, node: SimNode) -> None:
        """SIGTERM, as ``Node._shutdown`` handles it: hand unstarted stolen tasks back, stop
        probing and stealing (its loops see ``is_draining``), deregister, finish what it holds (its
        ticker ends it then); peers that still count it a member may take its queue. FastDeploy:
        its insert loop stops."""
        node.is_draining = True
        node.stats.left_s = self.loop.now
        node.sched.is_draining = True
        node.apply(node.sched.hand_back_pending("draining"))
        self.note_slots(node)
        if self.is_stealing:
            if self.loop.now >= 0:
                self.counters.redis_commands += 4  # MULTI, DEL, ZREM, EXEC
            self.loop.after(self.spec.redis_latency_s, functools.partial(self.registry.discard, node.node_id))
        if self.fd is not None:
            self.fd.leave(node)

    def _start(self, node: SimNode, at: float) -> None:
        self.loop.at(at, node.tick)
        if self.is_stealing:
            self.loop.at(at, node.heartbeat_loop)
            self.loop.at(at + PROBE_INTERVAL_S / 2, node.probe_loop)
        if self.fd is not None:
            self.loop.at(at, lambda node=node: self.fd.poll(node))  # type: ignore[misc, union-attr]

    # ---- where the waits go ----

    def idle_clock(self) -> float:
        """Seconds so far during which some live node had a free slot (``WaitRecord``): a
        request's idle-slot wait is this clock's advance over its wait, O(1) per request."""
        return self._idle_total + (self.loop.now - self._idle_since if self.num_free_nodes else 0.0)

    def note_slots(self, node: SimNode) -> None:
        """After anything that may change a node's slots or queue: keep the count of live nodes
        with a free slot (and the idle-slot clock) current, O(1)."""
        has_free = node.is_live and node.sched.free_slots > 0 and not node.sched.pending
        if has_free != node.has_free_slot:
            node.has_free_slot = has_free
            now = self.loop.now
            if self.num_free_nodes:
                self._idle_total += now - self._idle_since
            self._idle_since = now
            self.num_free_nodes += 1 if has_free else -1

    def note_admitted(self, request_id: str) -> None:
        trace = self.traces[int(request_id)]
        if trace.step_s is None:  # (a resumed request is admitted again after its first token)
            trace.admitted_s = self.loop.now
            trace.idle_at_admission = self.idle_clock()

    def note_steps(self, node: SimNode, inbox: list[EngineRequest | str], cost: float) -> None:
        """A step starts with the engine's adds in ``inbox``: their first tokens come at its end."""
        aborted = {op for op in inbox if isinstance(op, str)}
        for op in inbox:
            if isinstance(op, str) or op.request_id in aborted:
                continue
            trace = self.traces[int(op.request_id)]
            if trace.step_s is None:
                trace.step_s = self.loop.now
                trace.engine_token_s = self.loop.now + cost
                trace.ran_on = node.node_id

    def note_report(self, origin_id: str, grantable: int, num_submitted: int) -> None:
        """A peer heard how ``origin_id``'s queue looked when it had been given ``num_submitted``
        requests: those of them no peer had heard of are noticed now, if it had any to grant."""
        if grantable <= 0:
            return
        queue = self.nodes[origin_id].unnoticed
        while queue and queue[0][0] < num_submitted:
            trace = self.traces[queue.popleft()[1]]
            if trace.noticed_s is None:
                trace.noticed_s = self.loop.now

    def note_stolen(self, request_id: str, thief: SimNode, sent_at: float, grant_size: int) -> None:
        trace = self.traces[int(request_id)]
        trace.steal_sent_s, trace.grant_s, trace.grant_size, trace.thief = sent_at, self.loop.now, grant_size, thief.node_id

    def wait_records(self) -> list[WaitRecord]:
        out = []
        for item in self.items:
            record, trace = self.records[item.index], self.traces[item.index]
            arrival, ttft = item.arrival_s, record.ttft
            if trace.step_s is None or trace.admitted_s is None or trace.engine_token_s is None:
                out.append(WaitRecord(item.index, record.origin, record.served_by, arrival, None, ttft, None, None,
                                      None, None, None, 0.0))
                continue
            delivery = None if ttft is None else ttft - (trace.engine_token_s - arrival)
            steal: dict[str, Any] = {}
            if trace.grant_s is not None and trace.steal_sent_s is not None and trace.ran_on == trace.thief \
                    and trace.thief != record.origin:
                noticed = min(trace.noticed_s if trace.noticed_s is not None else math.inf, trace.steal_sent_s)
                steal = {"unnoticed_s": noticed - arrival, "decide_s": trace.steal_sent_s - noticed,
                         "round_trip_s": trace.grant_s - trace.steal_sent_s, "grant_size": trace.grant_size,
                         "to_first_token_s": trace.engine_token_s - trace.grant_s}
            out.append(WaitRecord(item.index, record.origin, record.served_by, arrival, trace.step_s, ttft,
                                  trace.step_s - arrival, trace.admitted_s - arrival, trace.step_s - trace.admitted_s,
                                  trace.engine_token_s - trace.step_s, delivery,
                                  trace.idle_at_admission - trace.idle_at_arrival, **steal))
        return out

    # ---- run ----

    def run(self, horizon: float | None = None) -> list[RequestRecord]:
        spec = self.spec
        for node in self.node_list:  # first: at one instant, a node joins before it is sent requests
            if node.stats.joined_s is not None:
                self.loop.at(node.stats.joined_s, functools.partial(self.join, node))
            leave = spec.leave_time(node.index)
            if leave is not None:
                self.loop.at(leave, functools.partial(self.leave, node))
        for item in self.items:
            self.loop.at(item.arrival_s, lambda item=item: self.arrive(item))  # type: ignore[misc]
        for node in self.node_list:
            if node.is_joined:
                self._start(node, node.index * TICK_S / max(1, spec.nodes) - WARM_UP_S)  # out of phase, as real nodes are
        last = max([self.items[-1].arrival_s if self.items else 0.0, *(t for _, t in spec.joins)])
        self.loop.run(lambda: self.finished >= len(self.items), horizon if horizon is not None else last + 3600.0)
        return [self.records[item.index] for item in self.items]


class SimFastDeploy:
    """FastDeploy's global scheduler (``fastdeploy.FdScheduler``) on the virtual clock.

    Each node's insert loop, while its engine has a free slot: pop up to two half-batches from its
    own list; else read the load set (members with at least ``min_load_score`` queued, least
    loaded first, the first 50), sample 10, pick one at random and pop half a batch from the
    front of its list; else block on its own list and those sampled for up to 2 s. A pop is
    decided when the loop turn starts and takes effect after the round trips its commands cost
    (one per command; two for a Lua-script ``ZINCRBY``, which asks ``SCRIPT EXISTS`` first).
    Redis commands are counted as ``INFO commandstats`` counts the real scheduler's (a write with
    its ``EXPIRE`` in a ``MULTI`` is four). A stolen request's results reach its origin one
    ``RPUSH`` and one pop later; results of one step bound for one origin share one ``RPUSH``.
    Not modelled: the real scheduler's batching of puts (each put here is its own two writes),
    its idle 10 s ``BLPOP`` on the response list and its 15 s keep-alive ``SET``.
    """

    PIPELINE = 4  # MULTI, the command, EXPIRE, EXEC
    SCRIPT_INCR = 6  # SCRIPT EXISTS, MULTI, EVALSHA, ZINCRBY (inside the script), EXPIRE, EXEC

    def __init__(self, cluster: SimCluster):
        self.cluster = cluster
        self.loop = cluster.loop
        self.spec = cluster.spec
        self.rtt = 2 * self.spec.redis_latency_s
        self.relay_delay_s = 3 * self.spec.redis_latency_s  # RPUSH, then the origin's blocked pop returns
        self.lists: dict[str, deque[Item]] = {node.node_id: deque() for node in cluster.node_list}
        self.load: dict[str, int] = {}  # the load sorted set (member -> queued count)
        self.active: set[str] = set()  # nodes inside a get (a turn, or blocked)
        self.blocked: dict[str, list[str]] = {}  # node -> the lists it BLPOPs, in blocking order
        self.rng = random.Random(self.spec.seed)
        self._relayed: set[tuple[str, str]] = set()  # (thief, origin) pairs relayed at _relayed_at
        self._relayed_at = -1.0

    def _count(self, commands: int) -> None:
        if self.loop.now >= 0:
            self.cluster.counters.redis_commands += commands

    def _incr(self, name: str, amount: int) -> None:
        self.load[name] = self.load.get(name, 0) + amount
        if self.load[name] == 0:
            del self.load[name]
            self._count(1)  # the script's ZREM

    # -- put: RPUSH and ZINCRBY at the origin
    def put(self, item: Item) -> None:
        origin = f"node{item.node}"
        self._count(self.PIPELINE + self.SCRIPT_INCR)

        def land() -> None:
            self.lists[origin].append(item)
            self._incr(origin, 1)
            self._wake(origin)

        self.loop.after(self.rtt, land)

    def _wake(self, owner: str) -> None:
        """A list got an element: the node blocked longest on it pops it (as BLPOP does)."""
        for node_id, keys in self.blocked.items():
            if owner in keys:
                self._pop_blocked(node_id, owner)
                return

    def _pop_blocked(self, node_id: str, owner: str) -> None:
        del self.blocked[node_id]
        if owner != node_id:
            self.cluster.counters.steals += 1
            self.cluster.counters.steals_granted += 1
            self.cluster.counters.tasks_stolen += 1
        item = self.lists[owner].popleft()
        self._incr(owner, -1)
        self._count(self.SCRIPT_INCR)
        node = self.cluster.nodes[node_id]
        self.loop.after(self.spec.redis_latency_s + 2 * self.rtt, lambda: self._dispatch(node, [item]))

    # -- get
    def poll(self, node: SimNode) -> None:
        """One turn of the node's insert loop, if it has a free slot and is not in one already
        (and runs: from its join, until it leaves)."""
        free = node.sched.free_slots - len(node.sched.pending)
        if node.node_id in self.active or free <= 0 or not node.is_live:
            return
        self.active.add(node.node_id)
        batch = min(free, fd.MAX_PREFILL_BATCH)
        mini = (batch + 1) // 2
        batches = [mini, batch - mini] if batch > mini else [mini]
        own = self.lists[node.node_id]
        cost, popped = 0.0, []
        for size in batches:
            cost += self.rtt
            self._count(self.PIPELINE)
            take = [own.popleft() for _ in range(min(size, len(own)))]
            if not take:
                break
            cost += 2 * self.rtt
            self._count(self.SCRIPT_INCR)
            self._incr(node.node_id, -len(take))
            popped += take
        candidates: list[str] = []
        if not popped:
            cost += self.rtt
            self._count(1)  # ZRANGEBYSCORE
            ranked = sorted((score, name) for name, score in self.load.items() if score >= self.spec.min_load_score)
            names = [name for _, name in ranked[:fd.LOAD_COUNT]]
            if names:
                candidates = [n for n in self.rng.sample(names, k=min(fd.SAMPLE, len(names))) if n != node.node_id]
        if candidates:
            lucky = self.rng.choice(candidates)
            cost += self.rtt
            self._count(1)  # LPOP
            victim = self.lists[lucky]
            take = [victim.popleft() for _ in range(min(batches[0], len(victim)))]
            if take:
                cost += 2 * self.rtt
                self._count(self.SCRIPT_INCR)
                self._incr(lucky, -len(take))
                popped += take
                self.cluster.counters.steals += 1
                self.cluster.counters.steals_granted += 1
                self.cluster.counters.tasks_stolen += len(take)
            else:
                cost += self.rtt
                self._count(1)  # EXISTS (every simulated node lives)
        if popped:
            self.loop.after(cost, lambda: self._dispatch(node, popped))
        else:
            self.loop.after(cost, lambda: self._block(node, [node.node_id, *candidates]))

    def leave(self, node: SimNode) -> None:
        """The node's insert loop stops (``FdScheduler.leave``): a BLPOP in place is dropped; what
        a turn in progress popped still reaches it and runs; its list stays for the others."""
        if self.blocked.pop(node.node_id, None) is not None:
            self.active.discard(node.node_id)

    def _block(self, node: SimNode, keys: list[str]) -> None:
        if not node.is_live:  # it left during this turn
            self.active.discard(node.node_id)
            return
        self._count(1)  # BLPOP
        self.blocked[node.node_id] = keys
        for key in keys:  # one of them has an element already: BLPOP returns it at once
            if self.lists[key]:
                self._pop_blocked(node.node_id, key)
                return

        def timeout() -> None:
            if self.blocked.get(node.node_id) is keys:  # still this BLPOP (each turn's keys are a new list)
                del self.blocked[node.node_id]
                self.active.discard(node.node_id)
                self.loop.after(fd.EMPTY_GET_SLEEP_S, lambda: self.poll(node))

        self.loop.after(fd.BLPOP_REQUEST_TIMEOUT_S, timeout)

    def _dispatch(self, node: SimNode, items: list[Item]) -> None:
        for item in items:
            self.cluster._submit(node, item, origin=f"node{item.node}")
        self.active.discard(node.node_id)
        self.poll(node)  # the insert loop goes round again at once

    # -- results
    def relay(self, node: SimNode, origin: str) -> None:
        if self.loop.now != self._relayed_at:
            self._relayed_at = self.loop.now
            self._relayed.clear()
        key = (node.node_id, origin)
        if key not in self._relayed:  # one RPUSH per origin per step, and the origin's LPOP that takes it
            self._relayed.add(key)
            self._count(2 * self.PIPELINE)


@dataclass
class RunResult:
    mode: Mode
    records: list[RequestRecord]
    summary: dict[str, Any]
    busy_fraction: dict[str, float]
    counters: Counters
    wall_s: float
    waits: list[WaitRecord] = field(default_factory=list)  # one per item, in the items' order
    nodes: dict[str, NodeStats] = field(default_factory=dict)


def simulate(spec: ClusterSpec, mode: Mode, items: list[Item]) -> RunResult:
    started = time.perf_counter()
    cluster = SimCluster(spec, mode, items)
    records = cluster.run()
    waits = cluster.wait_records()
    summary = summarize(records)
    makespan = max(summary["makespan_s"], 1e-9)
    busy = {node.node_id: node.busy_s / makespan for node in cluster.node_list}
    duration = max((r.finish_s or 0.0) for r in records) if records else 0.0
    summary["sim_time_s"] = duration
    summary["redis_commands_per_s_per_node"] = cluster.counters.redis_commands / max(duration, 1e-9) / spec.nodes
    summary["steals"] = cluster.counters.steals
    summary["tasks_stolen"] = cluster.counters.tasks_stolen
    trips = cluster.counters.steal_round_trips
    summary["steal_round_trip_ms_mean"] = 1000 * sum(trips) / len(trips) if trips else 0.0
    return RunResult(mode, records, summary, busy, cluster.counters, time.perf_counter() - started, waits,
                     {node.node_id: node.stats for node in cluster.node_list})


# ---- what the waits were made of ----

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.balance.simulate",
                                description="Simulate local, global, fastdeploy and oracle scheduling on the same workload.")
    p.add_argument("--nodes", type=int, nargs="+", default=[4])
    p.add_argument("--load", type=float, default=0.9, help="arrival rate as a fraction of the cluster's capacity")
    p.add_argument("--requests-per-node", type=int, default=75)
    p.add_argument("--arrival", choices=["poisson", "gamma", "steady"], default="poisson")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--decode-step-ms", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--json", default="", help="write the summaries here")
    p.add_argument("--plot", default="", help="write a PNG of p99 TTFT, mean E2EL and Redis rate by cluster size")
    p.add_argument("--decompose", action="store_true",
                   help="print where global's and oracle's waits went (stolen requests' parts, the slowest 1%%, "
                        "waits beside a free slot)")
    args = p.parse_args(argv)
    out: list[dict[str, Any]] = []
    for n in args.nodes:
        spec = ClusterSpec(nodes=n, max_num_seqs=args.max_num_seqs,
                           cost=dataclasses.replace(ClusterSpec().cost, decode_step_ms=args.decode_step_ms),
                           seed=args.seed)
        work = WorkloadSpec(num_requests=args.requests_per_node * n, arrival=args.arrival, seed=args.seed)
        capacity = sim_capacity_rps(spec.cost, spec.max_num_seqs, work, n)
        items = generate(work.at_rate(args.load * capacity), n)
        for mode in args.modes:
            result = simulate(spec, mode, items)
            s = result.summary
            print(f"{n:4d} nodes {mode:7s} ttft p50 {s['ttft']['p50']:.3f} p99 {s['ttft']['p99']:.3f}  "
                  f"e2el mean {s['e2el']['mean']:.3f} p99 {s['e2el']['p99']:.3f}  steals {s['steals']} "
                  f"stolen {s['tasks_stolen']}  redis/s/node {s['redis_commands_per_s_per_node']:.1f}  "
                  f"({result.wall_s:.1f} s)", file=sys.stderr)
            out.append({"nodes": n, "mode": mode, "load": args.load, **s})
            if args.decompose and mode in ("global", "oracle"):
                print(f"\n{n} nodes, {args.load:.0%} load, {len(items)} requests\n", flush=True)
                print("\n".join(format_decomposition(decompose(result.mode, result.waits))), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        plot_scale(out, args.plot)
    return 0


def plot_scale(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for mode in MODES:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["nodes"])
        if not mine:
            continue
        sizes = [r["nodes"] for r in mine]
        axes[0].plot(sizes, [r["ttft"]["p99"] for r in mine], "o-", label=mode)
        axes[1].plot(sizes, [r["e2el"]["mean"] for r in mine], "o-", label=mode)
        axes[2].plot(sizes, [r["redis_commands_per_s_per_node"] for r in mine], "o-", label=mode)
    for ax, label in zip(axes, ("p99 TTFT (s)", "mean end-to-end (s)", "Redis commands / s / node"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("nodes (simulated)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].set_yscale("log")  # FastDeploy's hundreds beside p2psched's few (local and oracle: none)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
