"""The scheduler core, driven by hand with a fake clock: no sockets, no threads, no sleeps.

``Pair`` wires an origin and a thief scheduler together the way the node does (messages go
through encode/decode), each with a simulated engine stepped synchronously.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from p2psched import PROTOCOL_VERSION
from p2psched.core.balance import Balancer, StealPlan
from p2psched.core.config import SimEngineConfig
from p2psched.core.engine import EngineLimits
from p2psched.core.errors import RequestRejected
from p2psched.core.protocol import (
    Cancel,
    Grant,
    Handback,
    Heartbeat,
    HeartbeatAck,
    Sampling,
    Steal,
    TokenItem,
    Tokens,
    decode,
    encode,
)
from p2psched.core.request import State
from p2psched.core.scheduler import ClientEvent, Effects, Scheduler, SchedulerParams
from p2psched.sim_engine import SimEngine, expected_tokens

SIM = SimEngineConfig(vocab_size=1000, decode_step_ms=0, decode_ms_per_seq=0, decode_ms_per_kilotoken=0,
                      prefill_ms_per_token=0, kv_tokens=10_000, max_model_len=1000)
LIMITS = EngineLimits(max_num_seqs=2, max_kv_tokens=10_000, max_model_len=1000, vocab_size=1000)


def make(node_id: str, lease_timeout: float = 1.0, max_queue_len: int = 100) -> Scheduler:
    return Scheduler(SchedulerParams(node_id, node_id + "-name", "model", LIMITS, ttl=30.0,
                                     lease_timeout=lease_timeout, max_queue_len=max_queue_len))


class Side:
    def __init__(self, node_id: str):
        self.sched = make(node_id)
        self.engine = SimEngine(SIM, LIMITS.max_num_seqs)
        self.client: dict[str, list[ClientEvent]] = {}
        self.outbox: list[tuple[str, bytes]] = []  # (destination id, frame)

    def apply(self, fx: Effects) -> None:
        for event in fx.client:
            self.client.setdefault(event.request_id, []).append(event)
        for request in fx.engine_add:
            self.engine.add(request)
        for request_id in fx.engine_abort:
            self.engine.abort(request_id)
        for dest, message in fx.to_origin + fx.to_thief:
            self.outbox.append((dest, encode(message)))

    def step(self, now: float) -> None:
        if self.engine.has_work():
            self.apply(self.sched.on_engine_outputs(self.engine.step().outputs, 0.0, now))

    def tokens_of(self, request_id: str) -> list[int]:
        return [t for e in self.client.get(request_id, []) for t in e.token_ids]


class Pair:
    def __init__(self) -> None:
        self.origin = Side("origin")
        self.thief = Side("thief")
        self.now = 0.0
        self.delivered = 0

    def deliver(self, drop_from_thief: bool = False) -> None:
        for src, dst in ((self.thief, self.origin), (self.origin, self.thief)):
            box, src.outbox = src.outbox, []
            for _, frame in box:
                if drop_from_thief and src is self.thief:
                    continue
                message = decode(frame)
                if isinstance(message, Tokens):
                    dst.apply(dst.sched.on_tokens(message, self.now))
                elif isinstance(message, Heartbeat):
                    dst.apply(dst.sched.on_heartbeat(message, self.now))
                elif isinstance(message, HeartbeatAck):
                    dst.apply(dst.sched.on_heartbeat_ack(message, self.now))
                elif isinstance(message, Cancel):
                    dst.apply(dst.sched.on_cancel(message, self.now))
                elif isinstance(message, Handback):
                    dst.apply(dst.sched.on_handback(message, self.now))
                else:
                    dst.sched.on_ack(message, self.now)  # type: ignore[arg-type]

    def steal(self, max_requests: int = 2, max_model_len: int = 1000) -> Grant:
        steal = Steal(PROTOCOL_VERSION, "s1", "origin", "thief", "thief-name", "model", max_requests, 10_000, max_model_len)
        sent, frame = self.origin.sched.on_steal(steal, self.now)
        grant = decode(frame)
        assert grant == sent and isinstance(grant, Grant)
        self.thief.apply(self.thief.sched.on_grant(grant, self.now))
        return grant

    def run(self, steps: int, thief_alive: bool = True) -> None:
        for _ in range(steps):
            self.now += 0.01
            self.origin.step(self.now)
            if thief_alive:
                self.thief.step(self.now)
            for side in (self.origin, self.thief) if thief_alive else (self.origin,):
                side.apply(side.sched.tick(self.now))
            self.deliver(drop_from_thief=not thief_alive)


def submit(side: Side, i: int, max_tokens: int, now: float = 0.0) -> str:
    request = side.sched.submit(f"req-{i}", [i + 1, 2, 3], Sampling(max_tokens=max_tokens, seed=i), now)
    side.apply(side.sched.admit(now))
    return request.request_id


def expected(i: int, max_tokens: int) -> list[int]:
    return expected_tokens(i, [i + 1, 2, 3], max_tokens, SIM.vocab_size)


def test_local_requests_run_in_order_of_arrival_and_finish():
    side = Side("solo")
    ids = [submit(side, i, 3) for i in range(3)]
    assert [r.request_id for r in side.sched.pending] == ["req-2"]  # two slots
    for _ in range(10):
        side.step(0.0)
    for i, rid in enumerate(ids):
        assert side.tokens_of(rid) == expected(i, 3)
        assert side.client[rid][-1].finish_reason == "length"
    assert side.sched.stats.ran_locally == 3 and not side.sched.requests


def test_stolen_requests_stream_back_exactly_once():
    pair = Pair()
    ids = [submit(pair.origin, i, 5) for i in range(6)]
    grant = pair.steal(max_requests=2)
    assert [t.request_id for t in grant.tasks] == ["req-2", "req-3"]  # the oldest waiting (0 and 1 run)
    assert pair.origin.sched.requests["req-2"].state is State.LEASED
    pair.run(40)
    for i, rid in enumerate(ids):
        assert pair.origin.tokens_of(rid) == expected(i, 5), rid
    assert {pair.origin.client[r][-1].served_by for r in ("req-2", "req-3")} == {"thief-name"}
    assert not pair.thief.sched.remote and not pair.thief.sched.requests  # finals acknowledged
    assert pair.origin.sched.stats.completed == 6


def test_silent_thief_is_fenced_and_the_origin_resumes_where_the_stream_stopped():
    pair = Pair()
    ids = [submit(pair.origin, i, 30) for i in range(4)]
    pair.steal(max_requests=1)
    stolen = "req-2"
    pair.run(5)
    delivered = len(pair.origin.tokens_of(stolen))
    assert 0 < delivered < 30
    pair.run(200, thief_alive=False)  # thief dies: nothing more comes from it
    assert pair.origin.sched.stats.lease_expiries == 1
    for i, rid in enumerate(ids):
        assert pair.origin.tokens_of(rid) == expected(i, 30), rid
    assert pair.origin.client[stolen][-1].attempts == 2


def test_tokens_from_a_fenced_epoch_are_dropped_and_cancelled():
    pair = Pair()
    for i in range(4):
        submit(pair.origin, i, 50)
    assert [t.request_id for t in pair.steal(max_requests=1).tasks] == ["req-2"]
    stale = Tokens(PROTOCOL_VERSION, "thief", "thief-name", [TokenItem("req-2", 7, 0, [1])])
    fx = pair.origin.sched.on_tokens(stale, 0.0)
    assert pair.origin.sched.stats.stale_items == 1
    assert fx.client == []
    assert [(dest, type(m).__name__) for dest, m in fx.to_thief] == [("thief", "Cancel")]


def test_a_gap_in_the_stream_takes_the_request_back():
    pair = Pair()
    for i in range(4):
        submit(pair.origin, i, 10)
    assert [t.request_id for t in pair.steal(max_requests=1).tasks] == ["req-2"]
    gap = Tokens(PROTOCOL_VERSION, "thief", "thief-name", [TokenItem("req-2", 0, 3, [1])])
    pair.origin.apply(pair.origin.sched.on_tokens(gap, 0.0))
    request = pair.origin.sched.requests["req-2"]
    assert request.state is State.PENDING and request.epoch == 1 and request.is_pinned
    assert pair.origin.sched.stats.stream_gaps == 1


def test_cancel_of_a_leased_request_reaches_the_thief_and_frees_it():
    pair = Pair()
    for i in range(4):
        submit(pair.origin, i, 100)
    assert [t.request_id for t in pair.steal(max_requests=1).tasks] == ["req-2"]
    pair.run(2)
    assert "req-2" in pair.thief.sched.running
    pair.origin.apply(pair.origin.sched.cancel("req-2", pair.now))
    pair.deliver()
    assert "req-2" not in pair.thief.sched.requests and not pair.thief.sched.running
    assert not pair.thief.engine.has_work()
    assert pair.origin.client["req-2"][-1].error == "cancelled"


def test_a_thief_whose_engine_dies_hands_its_stolen_tasks_back_and_the_origin_resumes_them():
    pair = Pair()
    ids = [submit(pair.origin, i, 30) for i in range(6)]
    stolen = [t.request_id for t in pair.steal(max_requests=2).tasks]
    pair.run(5)
    assert set(stolen) <= set(pair.thief.sched.running)
    assert all(0 < len(pair.origin.tokens_of(rid)) < 30 for rid in stolen)
    pair.thief.apply(pair.thief.sched.on_engine_failure("engine process exited"))
    assert not pair.thief.sched.requests and not pair.thief.sched.remote and not pair.thief.engine.has_work()
    assert pair.thief.client == {}  # not its requests: no client of its own hears of them
    pair.deliver()
    assert pair.origin.sched.stats.handbacks_received == 2
    pair.run(200, thief_alive=False)
    for i, rid in enumerate(ids):
        assert pair.origin.tokens_of(rid) == expected(i, 30), rid
    assert pair.origin.sched.stats.lease_expiries == 0  # handed back, not waited out
    assert pair.origin.sched.stats.completed == 6


def test_an_engine_failure_fails_the_nodes_own_requests_with_an_error():
    side = Side("solo")
    ids = [submit(side, i, 30) for i in range(3)]
    side.step(0.0)
    side.apply(side.sched.on_engine_failure("engine process exited (code -9)"))
    for rid in ids:
        assert side.client[rid][-1].error == "engine failure: engine process exited (code -9)"
    assert side.sched.stats.failed == 3 and not side.sched.requests and not side.sched.pending


def test_thief_drops_tasks_of_an_origin_that_went_silent():
    pair = Pair()
    for i in range(4):
        submit(pair.origin, i, 500)
    assert len(pair.steal(max_requests=1).tasks) == 1
    thief = pair.thief
    for _ in range(300):  # the origin never answers: its heartbeat acks never come
        pair.now += 0.01
        thief.step(pair.now)
        thief.apply(thief.sched.tick(pair.now))
        thief.outbox.clear()
    assert thief.sched.stats.origin_losses == 1
    assert not thief.sched.running and not thief.sched.remote


def test_pending_requests_past_their_deadline_fail():
    side = Side("solo")
    for i in range(3):
        submit(side, i, 900)
    side.apply(side.sched.tick(now=31.0))
    assert side.client["req-2"][-1].error == "request timed out waiting to be scheduled"
    assert side.sched.stats.failed == 1


def test_full_queue_is_rejected_with_503():
    sched = make("solo", max_queue_len=1)
    sched.submit("a", [1], Sampling(max_tokens=1, seed=0), 0.0)
    with pytest.raises(RequestRejected) as info:
        sched.submit("b", [1], Sampling(max_tokens=1, seed=0), 0.0)
    assert info.value.status == 503


def test_what_a_node_asks_for_depends_on_its_slots_and_its_queue():
    side = Side("solo")
    balancer = Balancer("solo", random.Random(0))
    balancer.set_members(["peer"])
    balancer.heard("peer", grantable=9, oldest_waited_s=1.0, now=0.0)
    assert side.sched.plan_steal(balancer, 0.0) == StealPlan("peer", 2, 10_000, 0.0)  # idle: anything, 2 slots
    submit(side, 0, 10)
    assert side.sched.plan_steal(balancer, 0.0) == StealPlan("peer", 1, 10_000 - 13, 0.0)
    submit(side, 1, 10)
    assert side.sched.plan_steal(balancer, 0.0) is None  # full, nothing queued: nothing to gain
    submit(side, 2, 10)  # queued since 0.0: at 0.5 s only older work is worth taking, one at a time
    assert side.sched.plan_steal(balancer, 0.5) == StealPlan("peer", 1, 10_000, pytest.approx(0.5 + 0.1))
    balancer.heard("peer", grantable=9, oldest_waited_s=1.55, now=1.5)
    assert side.sched.plan_steal(balancer, 1.5) is None  # its oldest is not 0.1 s older than ours (1.5 s)


def test_a_slot_that_frees_with_the_running_step_lets_a_busy_node_take_any_older_request():
    side = Side("solo")
    balancer = Balancer("solo", random.Random(0))
    balancer.set_members(["peer"])
    submit(side, 0, 3)
    submit(side, 1, 10)
    submit(side, 2, 10)  # queued since 0.0
    assert side.sched.slots_freeing == 0
    side.step(0.1)
    side.step(0.2)  # req-0 has 1 token left: its slot frees at the end of the step now running
    assert side.sched.slots_freeing == 1
    balancer.heard("peer", grantable=9, oldest_waited_s=0.25, now=0.2)  # older than ours (0.2 s), by less than 0.1
    # offering what is free once req-0 ends: all but req-1's prompt and max_tokens
    assert side.sched.plan_steal(balancer, 0.2) == StealPlan("peer", 1, 10_000 - 13, pytest.approx(0.2))


def test_a_victim_keeps_the_requests_its_freeing_slots_start_and_offers_the_rest():
    side = Side("victim")
    submit(side, 0, 2)
    submit(side, 1, 10)
    for i in (2, 3, 4):  # queued since 0.0, 0.1, 0.2
        submit(side, i, 10, now=0.1 * (i - 2))
    assert side.sched.queue_report(1.0) == (3, pytest.approx(1.0))
    side.step(0.5)  # req-0 has 1 token left: req-2 starts here when this step ends
    assert side.sched.slots_freeing == 1
    assert side.sched.queue_report(1.0) == (2, pytest.approx(0.9))
    steal = Steal(PROTOCOL_VERSION, "s", "victim", "t", "n", "model", 4, 10_000, 1000)
    grant, _ = side.sched.on_steal(steal, 1.0)
    assert [task.request_id for task in grant.tasks] == ["req-3", "req-4"]
    assert (grant.victim_grantable, grant.victim_oldest_waited_s) == (0, 0.0)
    assert [r.request_id for r in side.sched.pending] == ["req-2"]


def test_a_freeing_slot_claimed_by_a_stolen_request_is_not_stolen_for_again_and_a_stuck_engine_frees_none():
    origin, thief = Side("origin"), Side("thief")
    balancer = Balancer("thief", random.Random(0))
    balancer.set_members(["origin"])
    for i in range(6):
        submit(origin, i, 50, now=0.0)  # 2 run, 4 wait since 0.0
    submit(thief, 10, 2, now=1.0)
    submit(thief, 11, 50, now=1.0)
    submit(thief, 12, 50, now=1.0)  # queued since 1.0
    thief.step(1.1)  # req-10 has 1 token left
    assert thief.sched.slots_freeing == 1
    balancer.heard("origin", grantable=4, oldest_waited_s=1.1, now=1.1)
    plan = thief.sched.plan_steal(balancer, 1.1)
    assert plan is not None and plan.max_requests == 1
    steal = Steal(PROTOCOL_VERSION, "s", "origin", "thief", "thief-name", "model", plan.max_requests,
                  plan.max_tokens, 1000, plan.min_waited_s)
    grant, _ = origin.sched.on_steal(steal, 1.1)
    thief.apply(thief.sched.on_grant(grant, 1.1))
    assert thief.sched.pending.head().request_id == "req-2"  # type: ignore[union-attr]
    # 50 ms older than req-2: worth it for a freeing slot (no margin), not for one pinned in the
    # queue (0.1 s); the one freeing slot is req-2's now
    balancer.heard("origin", grantable=3, oldest_waited_s=1.15, now=1.1)
    assert thief.sched.plan_steal(balancer, 1.1) is None
    thief.sched.tick(1.2, engine_ok=False)
    assert thief.sched.slots_freeing == 0


def test_the_share_of_ends_announced_by_max_tokens_is_a_moving_average():
    side = Side("solo")
    assert side.sched.announced_share == 0.0
    submit(side, 0, 1)  # ends by length
    side.step(0.1)
    assert side.sched.announced_share == pytest.approx(0.05)
    first = expected_tokens(0, [7, 2, 3], 1, SIM.vocab_size)
    side.sched.submit("stop", [7, 2, 3], Sampling(max_tokens=5, seed=0, stop_token_ids=first), 0.1)
    side.apply(side.sched.admit(0.1))
    side.step(0.2)  # its first token is a stop id: an end nobody saw coming
    assert side.sched.requests.get("stop") is None
    assert side.sched.announced_share == pytest.approx(0.05 * 0.95)


def test_model_mismatch_and_a_failed_engine_give_empty_grants():
    side = Side("victim")
    for i in range(4):
        submit(side, i, 10)
    other = Steal(PROTOCOL_VERSION, "s", "victim", "t", "n", "another-model", 4, 10_000, 1000)
    assert side.sched.on_steal(other, 0.0)[0].reason == "model_mismatch"
    side.sched.is_accepting_steals = False
    same = Steal(PROTOCOL_VERSION, "s2", "victim", "t", "n", "model", 4, 10_000, 1000)
    assert side.sched.on_steal(same, 0.0)[0].reason == "not_accepting"
    assert len(side.sched.pending) == 2


def test_a_stolen_task_joins_the_thiefs_queue_by_how_long_it_waited():
    origin, thief = Side("origin"), Side("thief")
    for i in range(6):  # 0 and 1 run; 2..5 wait since t = 0
        submit(origin, i, 50, now=0.0)
    for i in range(4):  # the thief's own: two run, two wait since t = 1
        thief.sched.submit(f"own-{i}", [9, i], Sampling(max_tokens=50, seed=i), 1.0)
    thief.apply(thief.sched.admit(1.0))
    too_young = Steal(PROTOCOL_VERSION, "s1", "origin", "thief", "thief-name", "model", 1, 10_000, 1000, 2.0)
    empty, _ = origin.sched.on_steal(too_young, 1.5)  # nothing there has waited 2 s
    assert empty.tasks == [] and empty.victim_grantable == 4 and empty.victim_oldest_waited_s == pytest.approx(1.5)
    steal = Steal(PROTOCOL_VERSION, "s2", "origin", "thief", "thief-name", "model", 1, 10_000, 1000, 0.6)
    grant, _ = origin.sched.on_steal(steal, 1.5)
    assert [t.request_id for t in grant.tasks] == ["req-2"] and grant.tasks[0].waited_s == pytest.approx(1.5)
    assert (grant.victim_grantable, grant.victim_oldest_waited_s) == (3, pytest.approx(1.5))  # req-3 is next
    thief.apply(thief.sched.on_grant(grant, 1.5))
    assert [r.request_id for r in thief.sched.pending] == ["req-2", "own-2", "own-3"]  # it waited longest
    assert thief.sched.pending.head().arrival == pytest.approx(0.0)  # type: ignore[union-attr]


def test_a_full_queue_steals_nothing_and_a_node_whose_engine_failed_offers_nothing():
    side = Side("solo")
    side.sched.params = dataclasses.replace(side.sched.params, max_queue_len=3)
    balancer = Balancer("solo", random.Random(0))
    balancer.set_members(["peer"])
    for i in range(5):  # two run, three wait: the queue is full
        submit(side, i, 10, now=0.0)
    balancer.heard("peer", grantable=9, oldest_waited_s=30.0, now=1.0)
    assert side.sched.plan_steal(balancer, 1.0) is None
    assert side.sched.queue_report(1.0) == (3, pytest.approx(1.0))
    side.sched.is_accepting_steals = False
    assert side.sched.queue_report(1.0) == (0, 0.0)
