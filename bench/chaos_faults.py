"""Fault injection for the chaos suite: turns a scheduled ``Fault`` into signals, Redis
outages and proxy controls aimed at what the cluster is doing at that moment.

Each fault waits for its time, then fires once. Node faults (kill -9, SIGSTOP or an engine
stall, of a thief or of an origin) aim at one stolen request, at one point of its life:

- "prefill": as soon as a node's ``stolen_in`` (thief) or ``stolen_out`` (victim, the origin)
  counter rises, polled on every node's ``/stats``: a task has just changed hands and nothing
  of it has streamed yet;
- "mid_decode": a stolen request a third of the way through its tokens, as the client stream
  shows it (``p2psched.served_by`` names the node serving it);
- "before_last": a stolen request with one or two tokens left.

Stream triggers are checked in the client's chunk callback (``on_chunk``), so the signal lands
within a chunk of the chosen point. kill -9 is followed by a restart on the same ports (a new
node id); SIGSTOP by SIGCONT after the fault's duration; a Redis restart by a start on the same
port; link faults by healing. An engine stall is SIGUSR1: the node's next engine step hangs for
its ``--sim-stall-s`` while its event loop runs on; the injector watches ``/health`` (503
``engine_stalled`` once the step has run past a lease timeout, then 200 again) to log when the
stall was seen and when it ended, and the node counts as disturbed until then.

A fault that finds nothing to hit within ``ARM_TIMEOUT_S`` is skipped (and reported); at least
two nodes stay up at any time, and a node that has just recovered (restarted, SIGCONTed, its
stall over) is left alone for ``SETTLE_S``: back-to-back faults on the busiest origin would
pile its queue up until requests wait out the TTL, which the suite keeps for requests that
never start.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis

from bench.chaos_checker import FaultEvent
from bench.chaos_schedule import (
    KILL_KINDS,
    LINK_KINDS,
    NODE_KINDS,
    STALL_KINDS,
    ChaosPlan,
    Fault,
    RequestSpec,
)
from bench.tcp_proxy import ProxyThread
from p2psched.cluster import Cluster, NodeProcess

ARM_TIMEOUT_S = 8.0  # a fault that finds no target in this time is skipped
FRESH_S = 0.3  # a request counts as being served by a node if a chunk came this recently
PREFILL_POLL_S = 0.02
SETTLE_S = 2.0  # a node that just recovered is not hit again for this long
HEALTH_POLL_S = 0.05  # while watching a stalled engine
STALL_SEEN_GRACE_S = 1.5  # after the lease timeout: no 503 by then means the engine had no step to hang
UP, DOWN, STOPPED, STALLED = "up", "down", "stopped", "stalled"


@dataclass
class Live:
    """What the client knows of a request while it streams."""

    spec: RequestSpec
    origin: str = ""
    server: str | None = None  # the node whose tokens the last chunks carried
    delivered: int = 0
    last_chunk_at: float = 0.0

    @property
    def remaining(self) -> int:
        return self.spec.max_tokens - self.delivered


@dataclass
class Skipped:
    fault_id: int
    kind: str
    reason: str


@dataclass
class _Trigger:
    predicate: Callable[[Live], bool]
    target: Callable[[Live], str]  # the node to hit
    fire: Callable[[str, Live], str]  # hits it; returns a description
    future: asyncio.Future[tuple[str, str, float]]  # node, description, when it was hit


class Rig:
    """The system under test: Redis, nodes and their proxies, and each node's state."""

    def __init__(self, cluster: Cluster, proxies: ProxyThread, clock: Callable[[], float]):
        self.cluster = cluster
        self.proxies = proxies
        self.clock = clock
        self.state: dict[str, str] = {node.name: UP for node in cluster.nodes}
        self._recovered_at: dict[str, float] = {}

    def set_up(self, name: str) -> None:
        """The node is back (restarted, SIGCONTed, its stall over)."""
        self.state[name] = UP
        self._recovered_at[name] = self.clock()

    def node(self, name: str) -> NodeProcess:
        return next(node for node in self.cluster.nodes if node.name == name)

    def index(self, name: str) -> int:
        return next(i for i, node in enumerate(self.cluster.nodes) if node.name == name)

    def is_up(self, name: str | None) -> bool:
        return name is not None and self.state.get(name) == UP

    def is_settled(self, name: str | None) -> bool:
        """Up, and not just recovered from a fault: fair game for the next one."""
        return self.is_up(name) and self.clock() - self._recovered_at.get(name or "", -SETTLE_S) >= SETTLE_S

    def can_disturb(self) -> bool:
        """Whether one more node may go down or freeze: at least two stay up (one of two)."""
        up = sum(1 for s in self.state.values() if s == UP)
        return up - 1 >= min(2, len(self.state) - 1)

    def proxy_names(self, index: int) -> list[str]:
        return [f"node{index}/steal", f"node{index}/result"]


class Injector:
    def __init__(self, rig: Rig, plan: ChaosPlan, lives: dict[int, Live], session: aiohttp.ClientSession,
                 note: Callable[[str], None]):
        self.rig = rig
        self.plan = plan
        self.lives = lives
        self.session = session
        self.note = note
        self.events: list[FaultEvent] = []
        self.skipped: list[Skipped] = []
        self._armed: list[_Trigger] = []
        self._rng = random.Random(f"targets-{plan.seed}")
        self._is_redis_busy = False

    # ---- called by the client on every chunk ----

    def on_chunk(self, live: Live) -> None:
        for trigger in list(self._armed):
            if not trigger.future.done() and trigger.predicate(live):
                self._pull(trigger, live)

    # ---- one scheduled fault ----

    async def run(self, fault: Fault, start: float) -> None:
        await asyncio.sleep(max(0.0, start + fault.at_s - self.rig.clock()))
        try:
            await self._dispatch(fault)
        except (OSError, RuntimeError, ValueError, redis.RedisError, aiohttp.ClientError) as exc:
            # A fault that could not be carried out (a restart that failed, Redis that would not
            # come back) is reported, not fatal: ``restore`` tries again and the check runs.
            self.skipped.append(Skipped(fault.fault_id, fault.label, f"error: {exc!r}"))
            self.note(f"fault #{fault.fault_id} {fault.label} failed: {exc!r}")

    async def _dispatch(self, fault: Fault) -> None:
        kind = fault.kind
        if kind in NODE_KINDS:
            await self._node_fault(fault)
        elif kind == "redis_restart":
            await self._redis_restart(fault)
        elif kind == "redis_flushall":
            await self._redis_flushall(fault)
        elif kind in LINK_KINDS:
            await self._link(fault)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def _node_fault(self, fault: Fault) -> None:
        is_kill = fault.kind in KILL_KINDS
        is_stall = fault.kind in STALL_KINDS
        hits_origin = fault.kind.endswith("_origin")
        fire = self._kill_now if is_kill else self._stall_now if is_stall else self._stop_now
        if fault.point == "prefill":  # the moment a task changes hands, seen on either side
            hit = await self._at_steal(fault, "stolen_out" if hits_origin else "stolen_in", fire)
        elif fault.point in ("mid_decode", "before_last"):
            target: Callable[[Live], str] = (lambda live: live.origin) if hits_origin else \
                (lambda live: live.server or "")
            hit = await self._arm(fault, self._predicate(fault.point), target, fire)
        else:
            raise ValueError(f"fault #{fault.fault_id}: unknown point {fault.point!r}")
        if hit is None:
            return
        node, event = hit
        if is_kill:
            await self._restart(node, event)
        elif is_stall:
            await self._watch_stall(node, event)
        else:
            await asyncio.sleep(fault.duration_s)
            self._cont(node, event)

    # ---- targeting ----

    def _is_stolen_now(self, live: Live) -> bool:
        return (live.server is not None and live.server != live.origin and self.rig.is_settled(live.server)
                and self.rig.is_settled(live.origin) and self.rig.clock() - live.last_chunk_at < FRESH_S)

    def _predicate(self, point: str) -> Callable[[Live], bool]:
        def mid_decode(live: Live) -> bool:
            return self._is_stolen_now(live) and live.delivered >= max(2, live.spec.max_tokens // 3) \
                and live.remaining >= 3

        def before_last(live: Live) -> bool:
            return self._is_stolen_now(live) and live.spec.max_tokens >= 4 and 1 <= live.remaining <= 2

        return before_last if point == "before_last" else mid_decode

    async def _arm(self, fault: Fault, predicate: Callable[[Live], bool], target: Callable[[Live], str],
                   fire: Callable[[str, Live], str]) -> tuple[str, FaultEvent] | None:
        """Wait for a request that matches; hit its node. (node, event), or None when skipped."""
        future: asyncio.Future[tuple[str, str, float]] = asyncio.get_running_loop().create_future()

        def guarded(live: Live) -> bool:
            return self.rig.can_disturb() and predicate(live)

        trigger = _Trigger(guarded, target, fire, future)
        # Mid-decode lasts: a request already there will do. "Before the last token" is a moment:
        # only a chunk that just arrived can place it.
        now_matching = [] if fault.point == "before_last" else [live for live in self.lives.values() if guarded(live)]
        if now_matching:
            self._pull(trigger, self._rng.choice(now_matching))
        else:
            self._armed.append(trigger)
        try:
            node, detail, at = await asyncio.wait_for(asyncio.shield(future), ARM_TIMEOUT_S)
        except TimeoutError:
            if trigger in self._armed:
                self._armed.remove(trigger)
            if not future.done():
                self._skip(fault, "no request at that point within the arming time")
                return None
            node, detail, at = future.result()
        event = FaultEvent(fault.fault_id, fault.kind, node, at, at, detail, fault.point)
        self.events.append(event)
        self.note(f"fault #{fault.fault_id} {fault.label} -> {node}: {detail}")
        return node, event

    def _pull(self, trigger: _Trigger, live: Live) -> None:
        if trigger in self._armed:
            self._armed.remove(trigger)
        node = trigger.target(live)
        served = f"{live.delivered}/{live.spec.max_tokens} tokens"
        at = self.rig.clock()  # before the signal: a client cannot see its effect earlier
        detail = trigger.fire(node, live) + f" (request {live.spec.index}, origin {live.origin}, " \
                                            f"served by {live.server}, {served})"
        trigger.future.set_result((node, detail, at))

    # ---- actions ----

    def _kill_now(self, name: str, live: Live | None = None) -> str:
        node = self.rig.node(name)
        self.rig.state[name] = DOWN
        if node.proc is not None:
            node.proc.kill()  # SIGKILL, no wait: the point is now
        return f"kill -9 pid {node.pid}"

    def _stop_now(self, name: str, live: Live | None = None) -> str:
        node = self.rig.node(name)
        self.rig.state[name] = STOPPED
        node.pause()
        return f"SIGSTOP pid {node.pid}"

    def _stall_now(self, name: str, live: Live | None = None) -> str:
        node = self.rig.node(name)
        self.rig.state[name] = STALLED
        node.stall_engine()
        return f"SIGUSR1 pid {node.pid} (engine stall {self.plan.stall_s:g}s)"

    async def _health(self, name: str) -> tuple[int, str]:
        """(status, the body's "status" field) of the node's /health; (0, "") when it does not answer."""
        try:
            async with self.session.get(self.rig.node(name).url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
                body = await resp.json(content_type=None)
                return resp.status, str(body.get("status", "")) if isinstance(body, dict) else ""
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return 0, ""

    async def _watch_stall(self, name: str, event: FaultEvent) -> None:
        """Follow the stall on /health: 503 ``engine_stalled`` from one lease timeout into the hung
        step (heartbeats stop vouching then), 200 once the step returns. 503 here is the fault
        working, not a failure. The node counts as disturbed until the step has returned."""
        seen_at: float | None = None
        give_up = event.at + self.plan.lease_timeout + STALL_SEEN_GRACE_S
        while seen_at is None and self.rig.clock() < give_up:
            status, what = await self._health(name)
            if status == 503 and what == "engine_stalled":
                seen_at = self.rig.clock()
            else:
                await asyncio.sleep(HEALTH_POLL_S)
        if seen_at is None:
            event.until = self.rig.clock()
            event.observed = False
            event.detail += "; no 503 engine_stalled seen: its engine had no step to hang yet"
        else:
            give_up = event.at + self.plan.stall_s + 5.0
            while self.rig.clock() < give_up and (await self._health(name))[0] != 200:
                await asyncio.sleep(HEALTH_POLL_S)
            event.until = self.rig.clock()
            event.detail += (f"; /health 503 engine_stalled from +{seen_at - event.at:.2f}s, "
                             f"200 again at +{event.until - event.at:.2f}s")
        if self.rig.state[name] == STALLED:
            self.rig.set_up(name)
        self.note(f"{name} engine stall over (fault #{event.fault_id}): {event.detail.rsplit('; ', 1)[-1]}")

    def _cont(self, name: str, event: FaultEvent) -> None:
        self.rig.node(name).resume()
        self.rig.set_up(name)
        event.until = self.rig.clock()
        self.note(f"{name} SIGCONT after fault #{event.fault_id} ({event.until - event.at:.2f}s stopped)")

    async def _restart(self, name: str, event: FaultEvent) -> None:
        await asyncio.to_thread(self.rig.cluster.restart_node, self.rig.index(name), 60.0)
        self.rig.set_up(name)
        event.until = self.rig.clock()
        self.note(f"{name} restarted after fault #{event.fault_id} (pid {self.rig.node(name).pid}, "
                  f"{event.until - event.at:.1f}s down)")

    async def _at_steal(self, fault: Fault, counter: str, fire: Callable[[str, Live | None], str]
                        ) -> tuple[str, FaultEvent] | None:
        """Poll every up node's ``counter`` (``stolen_in``: it took tasks as a thief; ``stolen_out``:
        it granted tasks as a victim); hit the first whose counter rises, at once."""
        async def read(name: str) -> int | None:
            node = self.rig.node(name)
            try:
                async with self.session.get(node.url + "/stats", timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
                    body: dict[str, Any] = await resp.json()
                    return int(body["stats"][counter])
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError, TypeError):
                return None

        baseline: dict[str, int] = {}
        deadline = self.rig.clock() + ARM_TIMEOUT_S
        while self.rig.clock() < deadline:
            names = [n.name for n in self.rig.cluster.nodes if self.rig.is_up(n.name)]
            counts = await asyncio.gather(*(read(name) for name in names))
            for name, count in zip(names, counts):
                if count is None or not self.rig.is_up(name):
                    continue
                if name in baseline and count > baseline[name] and self.rig.can_disturb() \
                        and self.rig.is_settled(name):
                    at = self.rig.clock()
                    detail = fire(name, None) + f" ({counter} {baseline[name]} -> {count})"
                    event = FaultEvent(fault.fault_id, fault.kind, name, at, at, detail, fault.point)
                    self.events.append(event)
                    self.note(f"fault #{fault.fault_id} {fault.label} -> {name}: {detail}")
                    return name, event
                baseline[name] = count
            await asyncio.sleep(PREFILL_POLL_S)
        self._skip(fault, f"no node's {counter} rose within the arming time")
        return None

    async def _redis_restart(self, fault: Fault) -> None:
        if self._is_redis_busy or not self.rig.cluster.redis.is_running:
            self._skip(fault, "Redis is already away")
            return
        self._is_redis_busy = True
        try:
            event = FaultEvent(fault.fault_id, fault.kind, None, self.rig.clock(), 0.0,
                               f"redis-server stopped for {fault.duration_s:.2f}s")
            self.events.append(event)
            self.note(f"fault #{fault.fault_id} redis_restart: {event.detail}")
            await asyncio.to_thread(self.rig.cluster.redis.stop)
            await asyncio.sleep(fault.duration_s)
            await asyncio.to_thread(self.rig.cluster.redis.start)
            event.until = self.rig.clock()
        finally:
            self._is_redis_busy = False

    async def _redis_flushall(self, fault: Fault) -> None:
        if self._is_redis_busy or not self.rig.cluster.redis.is_running:
            self._skip(fault, "Redis is away")
            return
        server = self.rig.cluster.redis

        def flush() -> None:
            client = redis.Redis(host=server.host, port=server.port, socket_timeout=2)
            try:
                client.flushall()
            finally:
                client.close()

        at = self.rig.clock()
        await asyncio.to_thread(flush)
        self.events.append(FaultEvent(fault.fault_id, fault.kind, None, at, self.rig.clock(), "FLUSHALL"))
        self.note(f"fault #{fault.fault_id} redis_flushall")

    async def _link(self, fault: Fault) -> None:
        assert fault.node is not None
        name = self.rig.cluster.nodes[fault.node].name
        proxies = self.rig.proxy_names(fault.node)
        at = self.rig.clock()
        if fault.kind == "link_delay":
            detail = f"inbound peer links delayed {fault.delay_ms:.1f} ms each way for {fault.duration_s:.2f}s"
            for proxy in proxies:
                self.rig.proxies.set_delay(proxy, fault.delay_ms)
        else:
            detail = f"inbound peer links cut for {fault.duration_s:.2f}s"
            for proxy in proxies:
                self.rig.proxies.cut(proxy, fault.duration_s)
        event = FaultEvent(fault.fault_id, fault.kind, name, at, at + fault.duration_s, detail)
        self.events.append(event)
        self.note(f"fault #{fault.fault_id} {fault.kind} -> {name}: {detail}")
        await asyncio.sleep(fault.duration_s)
        for proxy in proxies:
            self.rig.proxies.set_delay(proxy, 0)
            self.rig.proxies.heal(proxy)
        event.until = self.rig.clock()

    def _skip(self, fault: Fault, reason: str) -> None:
        self.skipped.append(Skipped(fault.fault_id, fault.label, reason))
        self.note(f"fault #{fault.fault_id} {fault.label} skipped: {reason}")

    # ---- after the run ----

    async def restore(self) -> None:
        """Everything back: SIGCONT, restart dead nodes, heal links, Redis up."""
        for trigger in self._armed:
            trigger.future.cancel()
        self._armed.clear()
        for index, node in enumerate(self.rig.cluster.nodes):
            for proxy in self.rig.proxy_names(index):
                self.rig.proxies.set_delay(proxy, 0)
                self.rig.proxies.heal(proxy)
            if self.rig.state[node.name] == STOPPED:
                node.resume()
            if not node.is_alive:
                await asyncio.to_thread(self.rig.cluster.restart_node, index, 60.0)
            self.rig.state[node.name] = UP
        if not self.rig.cluster.redis.is_running:
            await asyncio.to_thread(self.rig.cluster.redis.start)

