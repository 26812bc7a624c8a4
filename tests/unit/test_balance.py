"""The thief's side of balancing (``core/balance.py``): whom to ask, for what, from what the
peers reported. A fake clock; no I/O."""

from __future__ import annotations

import random

import pytest

from p2psched.core.balance import FRUITLESS_CAP_S, Balancer, StealPlan


def balancer(**kwargs: float) -> Balancer:
    b = Balancer("me", random.Random(0), margin_s=0.1, fanout=2, max_age_s=1.0, **kwargs)  # type: ignore[arg-type]
    b.set_members(["a", "b", "c", "me"])
    return b


def idle(b: Balancer, now: float, free_slots: int = 3) -> StealPlan | None:
    return b.plan(now, free_slots=free_slots, free_kv_tokens=5000, queued=0, own_oldest_waited_s=0.0,
                  max_kv_tokens=9000)


def busy(b: Balancer, now: float, own_oldest_waited_s: float, freeing: int = 0,
         announced_share: float = 0.0) -> StealPlan | None:
    return b.plan(now, free_slots=0, free_kv_tokens=0, queued=4, own_oldest_waited_s=own_oldest_waited_s,
                  max_kv_tokens=9000, freeing=freeing, announced_share=announced_share,
                  freeing_kv_tokens=700 if freeing else 0)


def test_an_idle_slot_asks_the_peer_whose_oldest_waited_longest_for_anything():
    b = balancer()
    b.heard("a", grantable=5, oldest_waited_s=0.2, now=10.0)
    b.heard("b", grantable=1, oldest_waited_s=0.6, now=10.0)
    b.heard("c", grantable=0, oldest_waited_s=0.0, now=10.0)
    assert idle(b, 10.0) == StealPlan("b", max_requests=3, max_tokens=5000, min_waited_s=0.0)


def test_a_busy_node_takes_one_request_older_than_its_own_oldest_by_the_margin():
    b = balancer()
    b.heard("a", grantable=5, oldest_waited_s=0.5, now=10.0)
    assert busy(b, 10.0, own_oldest_waited_s=0.45) is None  # 50 ms older: within the margin
    assert busy(b, 10.0, own_oldest_waited_s=0.3) == StealPlan("a", 1, 9000, min_waited_s=0.4)


def test_a_busy_node_whose_slot_frees_with_this_step_takes_anything_older_than_its_own():
    """The stolen request lands at the head of its queue before the slot frees and starts in it,
    as a pooled queue would start the oldest request anywhere: no margin."""
    b = balancer()
    b.heard("a", grantable=5, oldest_waited_s=0.5, now=10.0)
    assert busy(b, 10.0, own_oldest_waited_s=0.45, freeing=1) == StealPlan("a", 1, 700, min_waited_s=0.45)
    assert busy(b, 10.0, own_oldest_waited_s=0.5, freeing=1) is None  # not older: ours goes first


def test_when_ends_are_announced_a_busy_node_pins_only_much_older_requests():
    """Nodes whose requests end by max_tokens see their slots free a step ahead, so a request
    taken into the queue now (pinned there) must be older by the wider margin, 0.3 s; a node
    whose requests end on EOS (announced share 0) keeps 0.1 s; between, in proportion."""
    b = balancer(announced_margin_s=0.3)
    b.heard("a", grantable=5, oldest_waited_s=0.5, now=10.0)
    assert busy(b, 10.0, own_oldest_waited_s=0.3, announced_share=0.0) is not None  # 0.2 s older > 0.1
    assert busy(b, 10.0, own_oldest_waited_s=0.3, announced_share=1.0) is None  # 0.2 s < 0.3
    assert busy(b, 10.0, own_oldest_waited_s=0.3, announced_share=0.25) is not None  # margin 0.15
    assert busy(b, 10.0, own_oldest_waited_s=0.3, announced_share=0.75) is None  # margin 0.25
    plan = busy(b, 10.0, own_oldest_waited_s=0.15, announced_share=1.0)
    assert plan is not None and plan.victim_id == "a" and plan.min_waited_s == pytest.approx(0.45)


def test_a_full_node_with_nothing_queued_steals_only_for_the_slots_that_free_with_this_step():
    b = balancer()
    b.heard("a", grantable=5, oldest_waited_s=3.0, now=10.0)
    # (what it asks for must fit the KV room it has once they end: the room it has now, and theirs)
    assert b.plan(10.0, free_slots=0, free_kv_tokens=100, queued=0, own_oldest_waited_s=0.0, max_kv_tokens=9000,
                  freeing=2, freeing_kv_tokens=700) == StealPlan("a", 2, 700, 0.1)  # waited 0.1 s at least
    b.heard("a", grantable=5, oldest_waited_s=0.05, now=10.0)
    assert b.plan(10.0, free_slots=0, free_kv_tokens=100, queued=0, own_oldest_waited_s=0.0, max_kv_tokens=9000,
                  freeing=2, freeing_kv_tokens=700) is None
    assert b.plan(10.0, free_slots=0, free_kv_tokens=100, queued=0, own_oldest_waited_s=0.0, max_kv_tokens=9000) is None
    assert b.plan(10.0, free_slots=2, free_kv_tokens=0, queued=0, own_oldest_waited_s=0.0, max_kv_tokens=9000) is None


def test_a_report_ages_with_the_clock_and_is_forgotten_when_old():
    b = balancer()
    b.heard("a", grantable=2, oldest_waited_s=0.1, now=10.0)
    assert busy(b, 10.0, own_oldest_waited_s=0.15) is None
    plan = busy(b, 10.3, own_oldest_waited_s=0.15)  # a's oldest has waited 0.4 s by now
    assert plan is not None and plan.victim_id == "a"
    assert b.queue_of("a").waited(10.3) == pytest.approx(0.4)  # type: ignore[union-attr]
    assert idle(b, 11.01) is None and b.queue_of("a") is None  # past max_age_s: dropped


def test_a_peer_that_did_not_answer_or_left_is_forgotten():
    b = balancer()
    b.heard("a", grantable=2, oldest_waited_s=0.5, now=10.0)
    b.heard("b", grantable=2, oldest_waited_s=0.4, now=10.0)
    b.lost("a")
    assert idle(b, 10.0).victim_id == "b"  # type: ignore[union-attr]
    b.set_members(["a", "c"])
    assert idle(b, 10.0) is None
    b.heard("stranger", grantable=9, oldest_waited_s=9.0, now=10.0)  # not a member: ignored
    assert idle(b, 10.0) is None


def test_nothing_grantable_means_nothing_to_ask_for():
    b = balancer()
    b.heard("a", grantable=3, oldest_waited_s=0.0, now=10.0)  # only pinned requests queued there
    assert idle(b, 10.0) is None


def test_probes_go_to_a_few_random_members_never_to_ourselves():
    b = balancer()
    rounds = [b.probe_targets() for _ in range(60)]
    assert all(len(r) == 2 and len(set(r)) == 2 and "me" not in r for r in rounds)
    assert {node for r in rounds for node in r} == {"a", "b", "c"}
    solo = Balancer("me", random.Random(0))
    assert solo.probe_targets() == []


def test_a_peer_with_nothing_for_us_is_left_alone_longer_each_time():
    b = balancer()
    for t, wait in ((10.0, 0.005), (11.0, 0.01), (12.0, 0.02)):
        b.heard("a", grantable=5, oldest_waited_s=0.5, now=t)
        b.granted("a", fruitless=True, now=t)
        assert idle(b, t + wait - 1e-6) is None
        assert idle(b, t + wait).victim_id == "a"  # type: ignore[union-attr]
    b.granted("a", fruitless=False, now=12.0)
    assert idle(b, 12.0).victim_id == "a"  # type: ignore[union-attr]


def test_the_wait_after_empty_grants_stops_growing_at_its_cap():
    b = balancer()
    for _ in range(12):
        b.granted("a", fruitless=True, now=10.0)
    b.heard("a", grantable=5, oldest_waited_s=0.5, now=10.0)
    assert idle(b, 10.0 + FRUITLESS_CAP_S - 1e-6) is None and idle(b, 10.0 + FRUITLESS_CAP_S) is not None


def test_min_load_score_is_how_many_a_victim_must_have_to_give():
    b = Balancer("me", random.Random(0), min_queue=3)
    b.set_members(["a"])
    b.heard("a", grantable=2, oldest_waited_s=5.0, now=10.0)
    assert idle(b, 10.0) is None
    b.heard("a", grantable=3, oldest_waited_s=5.0, now=10.0)
    assert idle(b, 10.0).victim_id == "a"  # type: ignore[union-attr]
