"""Issue 9's scheduler semantics, with the fake clock of ``test_scheduler.Pair``: grants checked
before leasing, hand-backs, the TTL as a limit on waiting (wherever the request runs), heartbeats
that vouch only for a progressing engine, and the stealer's backoff."""

from __future__ import annotations

import dataclasses

import msgspec

from p2psched import PROTOCOL_VERSION
from p2psched.core.engine import EngineLimits
from p2psched.core.protocol import (
    MAX_FRAME_BYTES,
    Grant,
    Handback,
    Heartbeat,
    Sampling,
    Steal,
    decode,
)
from p2psched.core.request import State

from .test_scheduler import LIMITS, Pair, Side, expected, submit


def steal_from(side: Side, max_requests: int = 4, max_tokens: int = 10_000, max_model_len: int = 1000,
               thief: str = "thief") -> Grant:
    steal = Steal(PROTOCOL_VERSION, f"s-{side.sched.stats.stolen_out}", side.sched.params.node_id, thief, thief + "-name", "model",
                  max_requests, max_tokens, max_model_len)
    grant, frame = side.sched.on_steal(steal, 0.0)
    assert decode(frame) == grant
    return grant


def test_a_task_the_wire_would_refuse_is_never_leased():
    """A request whose fields a peer's decoder refuses (here built around the HTTP schema) stays
    home, pinned; the rest of the grant goes out whole and only what went out is leased."""
    side = Side("victim")
    for i in range(6):  # two run; req-2 .. req-5 wait, oldest first
        submit(side, i, 10)
    side.sched.requests["req-2"].sampling = Sampling(max_tokens=10, seed=2, top_k=1 << 40)
    side.sched.requests["req-3"].sampling = Sampling(max_tokens=10, seed=3, top_k=1 << 64)  # not even encodable
    assert steal_from(side, max_requests=2).tasks == []  # the policy picked the two bad ones: pinned, none leased
    assert side.sched.stats.unsendable == 2 and len(side.sched.leases) == 0
    grant = steal_from(side)
    assert [t.request_id for t in grant.tasks] == ["req-4", "req-5"] and len(side.sched.leases) == 2
    assert side.sched.requests["req-2"].is_pinned and side.sched.requests["req-2"].state is State.PENDING


def test_grants_stop_at_the_byte_cap_and_lease_only_what_they_carry():
    limits = dataclasses.replace(LIMITS, max_kv_tokens=10_000_000, max_model_len=400_000, vocab_size=100_000)
    side = Side("victim")
    side.sched.params = dataclasses.replace(side.sched.params, limits=limits)
    for i in range(12):  # ~1.5 MB per task encoded: at most two fit in one frame
        side.sched.submit(f"big-{i}", [70_000 + i] * 300_000, Sampling(max_tokens=10, seed=i), 0.0)
    steal = Steal(PROTOCOL_VERSION, "s", "victim", "thief", "t", "model", 100, 10_000_000, 400_000)
    grant, frame = side.sched.on_steal(steal, 0.0)
    assert len(frame) <= MAX_FRAME_BYTES and 1 <= len(grant.tasks) < 6
    assert len(side.sched.leases) == len(grant.tasks)
    assert decode(frame) == grant


def test_victims_grant_only_what_fits_the_thiefs_context():
    side = Side("victim")
    for i in range(6):
        submit(side, i, 100 if i % 2 else 10)  # 103 or 13 tokens of context
    grant = steal_from(side, max_model_len=50)
    assert grant.tasks and all(len(t.prompt_token_ids) + t.sampling.max_tokens <= 50 for t in grant.tasks)


def test_a_thief_that_cannot_run_a_task_hands_it_back_and_the_origin_runs_it():
    """The thief's engine has a smaller vocabulary than the prompts need (as another refusal of
    its engine would): the task comes back at once, the origin runs it,
    and never grants it to that thief again."""
    pair = Pair()
    pair.thief.sched.params = dataclasses.replace(pair.thief.sched.params,
                                                  limits=dataclasses.replace(LIMITS, vocab_size=2))
    ids = [submit(pair.origin, i, 5) for i in range(8)]
    granted: list[str] = []
    for _ in range(4):  # the thief keeps asking; each task comes back, and is never offered to it again
        grant = pair.steal(max_requests=2)
        assert not set(t.request_id for t in grant.tasks) & set(granted)
        granted += [t.request_id for t in grant.tasks]
        assert not pair.thief.sched.requests
        pair.deliver()
    assert granted and pair.thief.sched.stats.handed_back == len(granted)
    assert all("thief" in pair.origin.sched.requests[r].refused_by for r in granted)
    assert all(pair.origin.sched.requests[r].state is State.PENDING for r in granted)
    pair.run(100)
    for i, rid in enumerate(ids):
        assert pair.origin.tokens_of(rid) == expected(i, 5), rid
    assert pair.origin.sched.stats.failed == 0 and pair.origin.sched.stats.handbacks_received == len(granted)


def test_a_stolen_request_that_started_has_no_deadline():
    """--scheduler-ttl bounds waiting: a stolen request streaming past the TTL is not failed
    (the thief's heartbeat at admission told the origin it started)."""
    pair = Pair()
    ids = [submit(pair.origin, i, 500 if i == 2 else 20) for i in range(4)]
    pair.steal(max_requests=1)  # req-2, the oldest waiting
    assert "req-2" in pair.thief.sched.running
    pair.deliver()  # the admission heartbeat
    assert pair.origin.sched.requests["req-2"].has_started
    pair.now = 29.0
    pair.run(200)  # well past ttl=30 s
    assert pair.origin.sched.stats.failed == 0
    pair.run(400)
    for i, rid in enumerate(ids):
        assert pair.origin.tokens_of(rid) == expected(i, 500 if i == 2 else 20), rid


def test_a_request_that_never_started_fails_at_its_deadline_wherever_it_waits():
    """Leased but stuck in the thief's queue past the TTL: the thief hands it back as expired
    and the origin fails it (its client gets the timeout error)."""
    pair = Pair()
    pair.thief.sched.params = dataclasses.replace(pair.thief.sched.params,
                                                  limits=dataclasses.replace(LIMITS, max_num_seqs=1))
    for i in range(6):
        submit(pair.origin, i, 900)
    grant = pair.steal(max_requests=2)  # the thief runs one and queues the other
    assert len(grant.tasks) == 2
    rid = grant.tasks[1].request_id
    assert pair.thief.sched.requests[rid].state is State.PENDING
    pair.thief.apply(pair.thief.sched.tick(31.0))
    assert rid not in pair.thief.sched.requests
    pair.now = 31.0
    pair.deliver()
    assert pair.origin.client[rid][-1].error == "request timed out waiting to be scheduled"


def test_heartbeats_stop_while_the_engine_is_stuck_so_the_origin_takes_the_work_back():
    pair = Pair()
    ids = [submit(pair.origin, i, 40) for i in range(4)]
    pair.steal(max_requests=1)
    pair.run(5)
    for _ in range(300):  # the thief's engine is stuck in a step: no tokens, and no vouching
        pair.now += 0.01
        pair.origin.step(pair.now)
        pair.origin.apply(pair.origin.sched.tick(pair.now))
        pair.thief.apply(pair.thief.sched.tick(pair.now, engine_ok=False))
        assert not any(isinstance(decode(f), Heartbeat) for _, f in pair.thief.outbox)
        pair.deliver()
    assert pair.origin.sched.stats.lease_expiries == 1
    pair.run(100)
    for i, rid in enumerate(ids):
        assert pair.origin.tokens_of(rid) == expected(i, 40), rid


def test_a_draining_origin_still_grants_its_queue_but_takes_no_stolen_work():
    """SIGTERM: the node takes no stolen work (a grant that lands after it is handed back), but
    its own queue stays grantable, so peers that still count it a member take what it would run
    last; every request still completes, exactly."""
    pair = Pair()
    ids = [submit(pair.origin, i, 20) for i in range(6)]  # two run, four wait
    pair.origin.sched.is_draining = True
    pair.thief.sched.is_draining = False
    assert pair.origin.sched.queue_report(0.0)[0] == 4
    grant = pair.steal(max_requests=2)
    assert len(grant.tasks) == 2
    pair.run(300)
    for i, rid in enumerate(ids):
        assert pair.origin.tokens_of(rid) == expected(i, 20), rid
    # the other way round: a grant that reaches a draining thief goes straight back
    back = Pair()
    back_ids = [submit(back.origin, i, 20) for i in range(6)]
    back.thief.sched.is_draining = True
    grant = back.steal(max_requests=2)
    assert len(grant.tasks) == 2 and not back.thief.sched.running and not back.thief.sched.pending
    back.run(300)
    for i, rid in enumerate(back_ids):
        assert back.origin.tokens_of(rid) == expected(i, 20), rid
    assert back.origin.sched.stats.handbacks_received == 2  # (per task)


def test_a_draining_thief_hands_back_what_it_has_not_started():
    pair = Pair()
    pair.thief.sched.params = dataclasses.replace(pair.thief.sched.params,
                                                  limits=dataclasses.replace(LIMITS, max_num_seqs=1))
    ids = [submit(pair.origin, i, 20) for i in range(8)]
    grant = pair.steal(max_requests=3)
    assert len(grant.tasks) == 3 and len(pair.thief.sched.running) == 1
    fx = pair.thief.sched.hand_back_pending("draining")
    assert [type(m) for _, m in fx.to_origin] == [Handback]
    pair.thief.apply(fx)
    pair.run(300)
    for i, rid in enumerate(ids):
        assert pair.origin.tokens_of(rid) == expected(i, 20), rid
    assert pair.origin.sched.stats.handbacks_received == 2


def test_handbacks_from_a_node_that_does_not_hold_the_lease_are_ignored():
    pair = Pair()
    for i in range(4):
        submit(pair.origin, i, 20)
    rid = pair.steal(max_requests=1).tasks[0].request_id
    from p2psched.core.protocol import HandbackItem

    forged = Handback(PROTOCOL_VERSION, "someone-else", [HandbackItem(rid, 0, "expired")])
    pair.origin.apply(pair.origin.sched.on_handback(forged, 0.0))
    assert pair.origin.sched.requests[rid].state is State.LEASED and rid not in pair.origin.client


def test_engine_limits_refuse_what_the_engine_cannot_run():
    limits = EngineLimits(max_num_seqs=2, max_kv_tokens=100, max_model_len=50, vocab_size=10)
    assert limits.refusal([1, 2], Sampling(max_tokens=10, seed=0)) is None
    assert limits.refusal([1] * 45, Sampling(max_tokens=10, seed=0)).code == "context_length_exceeded"
    assert limits.refusal([10], Sampling(max_tokens=1, seed=0)).param == "prompt"
    assert limits.refusal([1], Sampling(max_tokens=1, seed=0, stop=["x"])).param == "stop"


def test_finished_requests_do_not_pile_up_in_the_deadline_heap():
    """Memory must not grow with rate x TTL: entries of requests that started or ended go."""
    side = Side("solo")
    for i in range(3000):
        submit(side, i % 900, 1)
        side.step(0.0)
        side.apply(side.sched.tick(0.0))
    assert not side.sched.requests
    assert len(side.sched._deadlines) <= 1024 + 1


def test_tokens_no_engine_of_ours_could_make_fence_the_thief():
    """An id past the vocabulary (it would crash the engine on resume) or more tokens than
    max_tokens: the item is not delivered, the thief is fenced, the origin resumes exactly."""
    from p2psched.core.protocol import TokenItem, Tokens

    for bad in ([LIMITS.vocab_size], [1] * 6):
        pair = Pair()
        ids = [submit(pair.origin, i, 5) for i in range(4)]
        rid = pair.steal(max_requests=1).tasks[0].request_id
        fx = pair.origin.sched.on_tokens(Tokens(PROTOCOL_VERSION, "thief", "t", [TokenItem(rid, 0, 0, bad)]), 0.0)
        pair.origin.apply(fx)
        request = pair.origin.sched.requests[rid]
        assert request.delivered_token_ids == [] and request.epoch == 1 and request.state is not State.LEASED
        assert pair.origin.sched.stats.invalid_items == 1 and rid not in pair.origin.client
        pair.run(100)
        for i, r in enumerate(ids):
            assert pair.origin.tokens_of(r) == expected(i, 5), r


def test_a_thief_takes_only_what_the_granting_origin_may_hand_out():
    """Tasks naming another origin and repeated ids are dropped; past the queue's room they go
    back as "full" (not "cannot run": the origin may grant them to this thief later)."""
    pair = Pair()
    for i in range(8):
        submit(pair.origin, i, 5)
    steal = Steal(PROTOCOL_VERSION, "s", "origin", "thief", "t", "model", 4, 10_000, 1000)
    grant, _ = pair.origin.sched.on_steal(steal, 0.0)
    assert len(grant.tasks) >= 2
    foreign = msgspec.structs.replace(grant.tasks[0], request_id="other-1", origin_id="someone-else")
    forged = msgspec.structs.replace(grant, tasks=[*grant.tasks, grant.tasks[0], foreign])
    pair.thief.sched.params = dataclasses.replace(pair.thief.sched.params, max_queue_len=1)
    fx = pair.thief.sched.on_grant(forged, 0.0)
    held = set(pair.thief.sched.requests)
    assert "other-1" not in held and held <= {t.request_id for t in grant.tasks}
    backs = [m for dest, m in fx.to_origin if isinstance(m, Handback)]
    assert [dest for dest, m in fx.to_origin if isinstance(m, Handback)] == ["origin"] * len(backs)
    assert {item.reason for m in backs for item in m.items} == {"full"}
    assert len(held) + sum(len(m.items) for m in backs) == len(grant.tasks)


def test_an_expired_handback_before_our_deadline_is_run_not_failed():
    """The thief's clock may run ahead: the origin fails a request only by its own clock."""
    from p2psched.core.protocol import HandbackItem

    pair = Pair()
    for i in range(4):
        submit(pair.origin, i, 5)
    rid = pair.steal(max_requests=1).tasks[0].request_id
    pair.origin.apply(pair.origin.sched.on_handback(
        Handback(PROTOCOL_VERSION, "thief", [HandbackItem(rid, 0, "expired")]), 1.0))
    assert pair.origin.sched.requests[rid].state is State.PENDING and rid not in pair.origin.client


def test_a_leased_request_gets_a_lease_timeout_past_its_deadline_to_be_reported_started():
    """A thief may admit a task just before its deadline, its heartbeat on the way: the origin
    waits one lease timeout past the deadline before failing a leased request that has not
    been reported started."""
    from p2psched.core.protocol import LeaseRef

    for started in (True, False):
        side = Side("origin")
        for i in range(4):
            submit(side, i, 900)
        rid = steal_from(side, max_requests=1).tasks[0].request_id
        side.apply(side.sched.on_heartbeat(Heartbeat(PROTOCOL_VERSION, "thief", [LeaseRef(rid, 0, False)]), 29.5))
        side.apply(side.sched.tick(30.2))  # past the deadline (30), within the grace
        assert rid not in side.client
        side.apply(side.sched.on_heartbeat(Heartbeat(PROTOCOL_VERSION, "thief", [LeaseRef(rid, 0, started)]), 30.3))
        side.apply(side.sched.tick(31.1))
        failed = rid in side.client and side.client[rid][-1].error is not None
        assert failed is not started
