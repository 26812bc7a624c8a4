import random

from p2psched.core.pending import PendingQueue
from p2psched.core.policy import PeerLoad, choose_victims, select_grant
from p2psched.core.protocol import Sampling
from p2psched.core.request import Request


def peer(node_id, pending, model="m", tokens=0):
    return PeerLoad(node_id, node_id, model, f"tcp://x/{node_id}", f"tcp://y/{node_id}", pending, tokens)


def req(i, prompt=10, max_tokens=10, pinned=False):
    return Request(f"r{i}", [1] * prompt, Sampling(max_tokens=max_tokens, seed=i), 0.0, 100.0, is_pinned=pinned)


def test_victims_are_most_loaded_first_and_filtered():
    peers = [peer("me", 50), peer("a", 3), peer("b", 9), peer("c", 2), peer("d", 9, model="other"), peer("e", 5)]
    victims = choose_victims(peers, "me", "m", 3, random.Random(0))
    assert [p.node_id for p in victims] == ["b", "e", "a"]


def test_victim_ties_are_broken_at_random():
    peers = [peer(n, 4) for n in "abcdef"]
    firsts = {choose_victims(peers, "me", "m", 1, random.Random(seed))[0].node_id for seed in range(50)}
    assert len(firsts) > 1


def grant(requests, max_requests, max_tokens, max_model_len=100_000, thief_id="thief"):
    queue = PendingQueue()
    for r in requests:
        queue.push_back(r)
    return select_grant(queue.from_back(), queue.total_work, max_requests, max_tokens, max_model_len, thief_id)


def test_grant_never_takes_the_head_and_stops_near_half():
    pending = [req(i) for i in range(10)]  # 20 tokens of work each, 200 in all
    granted = grant(pending, max_requests=100, max_tokens=10_000)
    assert [r.request_id for r in granted] == ["r9", "r8", "r7", "r6", "r5"]
    assert pending[0] not in granted


def test_grant_respects_thief_capacity_and_pins():
    pending = [req(0), req(1), req(2, pinned=True), req(3, prompt=500), req(4)]
    granted = grant(pending, max_requests=2, max_tokens=100)
    assert [r.request_id for r in granted] == ["r4", "r1"]
    assert grant(pending, max_requests=1, max_tokens=5) == []


def test_grant_from_one_request_queue_is_empty():
    assert grant([req(0)], 10, 10_000) == []
    assert [r.request_id for r in grant([req(0), req(1, prompt=1000)], 10, 10_000)] == ["r1"]


def test_pending_queue_keeps_order_and_work_total():
    queue = PendingQueue()
    a, b, c = req(0), req(1, prompt=30), req(2)
    queue.push_back(a)
    queue.push_back(b)
    queue.push_front(c)
    assert [r.request_id for r in queue] == ["r2", "r0", "r1"]
    assert queue.total_work == 20 + 40 + 20
    assert [r.request_id for r in queue.from_back()] == ["r1", "r0"]
    queue.remove(a)
    assert queue.pop_front() is c and queue.head() is b and queue.total_work == 40
