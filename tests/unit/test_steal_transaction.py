"""The steal transaction without sockets: the thief's table of sent steals, the victim's grant
cache, and the one reservation formula both sides count a steal with (``steals.py``,
``scheduler.kv_reservation``). A fake clock; no I/O."""

from __future__ import annotations

import random

import pytest

from p2psched import PROTOCOL_VERSION
from p2psched.core.balance import Balancer
from p2psched.core.engine import EngineLimits
from p2psched.core.errors import IllegalTransition
from p2psched.core.protocol import Cancel, Grant, Sampling, Steal, Task, decode
from p2psched.core.request import kv_reservation
from p2psched.core.scheduler import Scheduler, SchedulerParams
from p2psched.core.stats import Stats
from p2psched.core.steals import GrantCache, GrantVerdict, SentSteals, StealState


def grant(steal_id: str, victim_id: str, num_tasks: int = 1, reason: str = "ok") -> Grant:
    tasks = [Task(f"{victim_id}-r{i}", victim_id, victim_id, 0, [1, 2], [], Sampling(max_tokens=4, seed=i), 1e9)
             for i in range(num_tasks)]
    return Grant(PROTOCOL_VERSION, steal_id, victim_id, tasks, 0, reason)  # type: ignore[arg-type]


def table(max_steals: int = 256) -> tuple[SentSteals, Stats]:
    stats = Stats()
    return SentSteals(stats, max_steals), stats


# ---- the thief's table ----

def test_a_grant_for_a_steal_in_flight_is_applied_once_and_a_repeat_is_dropped():
    steals, stats = table()
    steals.sent("s1", "victim", now=0.0)
    assert steals.on_grant(grant("s1", "victim"), via="victim", now=0.1) is GrantVerdict.APPLY
    assert steals.on_grant(grant("s1", "victim"), via="victim", now=0.2) is GrantVerdict.REPEATED
    assert dict(stats.grants_dropped) == {"repeated": 1}
    assert stats.late_grants == 0


def test_a_grant_for_a_steal_never_sent_is_dropped_as_unsolicited():
    steals, stats = table()
    steals.sent("s1", "victim", now=0.0)
    verdict = steals.on_grant(grant("s2", "victim", num_tasks=3), via="victim", now=0.1)
    assert verdict is GrantVerdict.UNSOLICITED and not verdict.is_applied
    assert dict(stats.grants_dropped) == {"unsolicited": 1}
    assert steals.get("s1") is not None and steals.get("s1").state is StealState.IN_FLIGHT  # type: ignore[union-attr]


def test_the_table_is_bounded_and_a_grant_for_a_forgotten_steal_is_unsolicited():
    steals, stats = table(max_steals=3)
    for i in range(5):
        steals.sent(f"s{i}", "victim", now=float(i))
        steals.gave_up(f"s{i}")
    assert len(steals) == 3
    assert steals.on_grant(grant("s1", "victim"), via="victim", now=9.0) is GrantVerdict.UNSOLICITED
    assert steals.on_grant(grant("s2", "victim"), via="victim", now=9.0) is GrantVerdict.LATE
    assert (stats.grants_dropped["unsolicited"], stats.late_grants) == (1, 1)


def test_a_late_grant_is_applied_once():
    """The caller gave up waiting; the victim had already leased the tasks to us, so they are
    taken (and run or handed straight back) rather than left for the lease to lapse."""
    steals, stats = table()
    steals.sent("s1", "victim", now=0.0)
    steals.gave_up("s1")
    assert steals.get("s1").state is StealState.ABANDONED  # type: ignore[union-attr]
    verdict = steals.on_grant(grant("s1", "victim", num_tasks=2), via="victim", now=5.0)
    assert verdict is GrantVerdict.LATE and verdict.is_applied
    assert steals.on_grant(grant("s1", "victim", num_tasks=2), via="victim", now=5.1) is GrantVerdict.REPEATED
    assert (stats.late_grants, dict(stats.grants_dropped)) == (1, {"repeated": 1})


def test_giving_up_after_the_answer_changes_nothing():
    steals, _ = table()
    steals.sent("s1", "victim", now=0.0)
    steals.on_grant(grant("s1", "victim"), via="victim", now=0.1)
    steals.gave_up("s1")
    steals.gave_up("never-sent")
    assert steals.get("s1").state is StealState.ANSWERED  # type: ignore[union-attr]


def test_a_grant_from_another_victim_is_dropped_and_the_real_one_still_applies():
    steals, stats = table()
    steals.sent("s1", "victim", now=0.0)
    # names another node than the one asked, on the right link
    assert steals.on_grant(grant("s1", "intruder"), via="victim", now=0.1) is GrantVerdict.WRONG_VICTIM
    # the right name, but it came in on another peer's link
    assert steals.on_grant(grant("s1", "victim"), via="intruder", now=0.1) is GrantVerdict.WRONG_VICTIM
    # a "wrong_node" reply carrying tasks is no restart notice
    assert steals.on_grant(grant("s1", "intruder", 1, "wrong_node"), via="victim", now=0.1) \
        is GrantVerdict.WRONG_VICTIM
    assert dict(stats.grants_dropped) == {"wrong_victim": 3}
    assert steals.on_grant(grant("s1", "victim"), via="victim", now=0.2) is GrantVerdict.APPLY


def test_an_empty_wrong_node_reply_from_the_victims_ports_is_a_restart_not_a_drop():
    steals, stats = table()
    steals.sent("s1", "old-victim", now=0.0)
    verdict = steals.on_grant(grant("s1", "new-process", 0, "wrong_node"), via="old-victim", now=0.1)
    assert verdict is GrantVerdict.RESTARTED and not verdict.is_applied
    assert (dict(stats.grants_dropped), stats.late_grants) == ({}, 0)
    assert steals.on_grant(grant("s1", "old-victim"), via="old-victim", now=0.2) is GrantVerdict.REPEATED


def test_steal_ids_are_never_reused_and_transitions_are_checked():
    steals, _ = table()
    steal = steals.sent("s1", "victim", now=0.0)
    with pytest.raises(AssertionError):
        steals.sent("s1", "victim", now=0.1)
    steal.move(StealState.ANSWERED)
    with pytest.raises(IllegalTransition):
        steal.move(StealState.ABANDONED)


# ---- the victim's grant cache ----

def test_a_repeated_steal_id_from_the_same_thief_gets_the_same_reply():
    stats = Stats()
    cache = GrantCache(stats)
    cache.put("thief", "s1", b"grant-1")
    assert cache.replay("thief", "s1") == b"grant-1"
    assert cache.replay("other-thief", "s1") is None  # another thief's id is not this one's answer
    assert cache.replay("thief", "s2") is None
    assert stats.grants_replayed == 1


def test_the_grant_cache_is_bounded_by_count_oldest_first():
    cache = GrantCache(Stats(), max_grants=3, max_bytes=1_000)
    for i in range(5):
        cache.put("thief", f"s{i}", b"x" * 10)
    assert len(cache) == 3 and cache.num_bytes == 30
    assert [cache.replay("thief", f"s{i}") is not None for i in range(5)] == [False, False, True, True, True]


def test_the_grant_cache_is_bounded_by_bytes():
    cache = GrantCache(Stats(), max_grants=100, max_bytes=25)
    cache.put("thief", "a", b"x" * 10)
    cache.put("thief", "b", b"x" * 10)
    cache.put("thief", "c", b"x" * 10)
    assert (len(cache), cache.num_bytes) == (2, 20)
    assert cache.replay("thief", "a") is None
    cache.put("thief", "big", b"x" * 26)  # larger than the whole cache: not kept, nothing evicted for it
    assert (len(cache), cache.num_bytes, cache.replay("thief", "big")) == (2, 20, None)


def test_replacing_an_entry_keeps_the_byte_count_exact():
    cache = GrantCache(Stats(), max_grants=10, max_bytes=100)
    cache.put("thief", "s1", b"x" * 40)
    cache.put("thief", "s1", b"y" * 30)
    assert (len(cache), cache.num_bytes, cache.replay("thief", "s1")) == (1, 30, b"y" * 30)


# ---- one reservation formula for thief and victim ----

def test_kv_reservation():
    assert kv_reservation(10, 100) == 110  # all of max_tokens
    assert kv_reservation(10, 100, reserve_output_tokens=16) == 26  # an engine that overcommits
    assert kv_reservation(10, 5, reserve_output_tokens=16) == 15


def node(node_id: str, limits: EngineLimits) -> Scheduler:
    return Scheduler(SchedulerParams(node_id, node_id, "model", limits, ttl=30.0, lease_timeout=1.0,
                                     max_queue_len=1000))


@pytest.mark.parametrize("seed", range(20))
def test_the_victim_fits_what_the_thief_books(seed: int):
    """The thief offers its free KV tokens; the victim grants tasks whose full reservations fit
    the offer; the thief, which overcommits its own requests (16 output tokens reserved), starts
    every granted task at once and its free KV tokens fall by exactly what the victim counted,
    then come back in full when the tasks end."""
    rng = random.Random(seed)
    thief = node("thief", EngineLimits(max_num_seqs=8, max_kv_tokens=6_000, max_model_len=4_000, vocab_size=1000,
                                       reserve_output_tokens=16))
    victim = node("victim", EngineLimits(max_num_seqs=1, max_kv_tokens=100_000, max_model_len=4_000,
                                         vocab_size=1000))
    for i in range(rng.randint(0, 4)):  # some of the thief's own work, admitted overcommitted
        thief.submit(f"own-{i}", [1] * rng.randint(1, 50), Sampling(max_tokens=rng.randint(1, 3000), seed=i), 0.0)
    thief.admit(0.0)
    for i in range(30):
        victim.submit(f"v-{i}", [1] * rng.randint(1, 500), Sampling(max_tokens=rng.randint(1, 3000), seed=i), 0.0)
    balancer = Balancer("thief", rng)
    balancer.set_members(["victim"])
    balancer.heard("victim", grantable=30, oldest_waited_s=1.0, now=0.0)
    plan = thief.plan_steal(balancer, 0.0)
    assert plan is not None and plan.min_waited_s == 0.0  # an idle thief: its free slots and KV
    offer = plan.max_tokens
    steal = Steal(PROTOCOL_VERSION, "s1", "victim", "thief", "thief", "model", plan.max_requests, offer, 4_000)
    sent, frame = victim.on_steal(steal, 0.0)
    granted = decode(frame)
    assert isinstance(granted, Grant) and granted == sent
    victim_count = sum(kv_reservation(len(t.prompt_token_ids), t.sampling.max_tokens) for t in granted.tasks)
    assert victim_count <= offer

    fx = thief.on_grant(granted, 0.0)
    assert sorted(r.request_id for r in fx.engine_add) == sorted(t.request_id for t in granted.tasks)
    assert offer - thief.free_kv_tokens == victim_count
    for task in granted.tasks:
        thief.on_cancel(Cancel(PROTOCOL_VERSION, task.origin_id, task.request_id, task.epoch, "test"), 0.0)
    assert thief.free_kv_tokens == offer


def test_a_long_task_fits_a_thief_only_when_its_full_reservation_does():
    """On the wire a task costs prompt + max_tokens, whatever the thief's engine reserves for
    its own requests; a task over the offer stays with the victim."""
    victim = node("victim", EngineLimits(max_num_seqs=1, max_kv_tokens=100_000, max_model_len=4_000,
                                         vocab_size=1000))
    for i in range(2):
        victim.submit(f"v-{i}", [1] * 100, Sampling(max_tokens=3000, seed=i), 0.0)
    small = Steal(PROTOCOL_VERSION, "s1", "victim", "thief", "thief", "model", 4, 3_099, 4_000)
    assert victim.on_steal(small, 0.0)[0].tasks == []
    enough = Steal(PROTOCOL_VERSION, "s2", "victim", "thief", "thief", "model", 4, 3_100, 4_000)
    assert [t.request_id for t in victim.on_steal(enough, 0.0)[0].tasks] == ["v-0"]  # the offer holds one

