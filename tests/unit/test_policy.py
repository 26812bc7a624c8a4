from p2psched.core.pending import PendingQueue
from p2psched.core.policy import select_grant
from p2psched.core.protocol import Sampling
from p2psched.core.request import Request


def req(i, prompt=10, max_tokens=10, pinned=False, arrival=0.0):
    return Request(f"r{i}", [1] * prompt, Sampling(max_tokens=max_tokens, seed=i), arrival, 100.0, is_pinned=pinned)


def grant(requests, max_requests, max_tokens, max_model_len=100_000, thief_id="thief", arrived_by=1e9):
    queue = PendingQueue()
    for r in requests:
        queue.push_back(r)
    return select_grant(queue, max_requests, max_tokens, max_model_len, thief_id, arrived_by)


def ids(requests):
    return [r.request_id for r in requests]


def test_grant_takes_the_oldest_first_head_included():
    pending = [req(i, arrival=float(i)) for i in range(10)]
    assert ids(grant(pending, max_requests=3, max_tokens=10_000)) == ["r0", "r1", "r2"]


def test_grant_gives_only_requests_that_waited_as_long_as_the_thief_asks():
    pending = [req(i, arrival=float(i)) for i in range(10)]
    assert ids(grant(pending, max_requests=100, max_tokens=10_000, arrived_by=4.5)) == ["r0", "r1", "r2", "r3", "r4"]
    assert grant(pending, max_requests=100, max_tokens=10_000, arrived_by=-1.0) == []


def test_grant_respects_thief_capacity_and_pins():
    pending = [req(0), req(1), req(2, pinned=True), req(3, prompt=500), req(4)]
    assert ids(grant(pending, max_requests=2, max_tokens=100)) == ["r0", "r1"]
    assert ids(grant(pending, max_requests=5, max_tokens=100)) == ["r0", "r1", "r4"]  # r3 is too big, r2 pinned
    assert ids(grant(pending, max_requests=5, max_tokens=25)) == ["r0"]
    assert grant(pending, max_requests=1, max_tokens=5) == []


def test_a_pinned_request_at_the_front_neither_goes_nor_stops_the_others():
    resumed = req(9, arrival=50.0, pinned=True)  # a resumed request goes first whatever its age
    assert ids(grant([resumed, req(0, arrival=1.0), req(1, arrival=2.0)], 5, 10_000, arrived_by=10.0)) == ["r0", "r1"]


def test_a_request_the_thief_handed_back_is_not_offered_to_it_again():
    refused = req(0)
    refused.refused_by.add("thief")
    assert ids(grant([refused, req(1)], 5, 10_000)) == ["r1"]
    assert ids(grant([refused, req(1)], 5, 10_000, thief_id="other")) == ["r0", "r1"]


def test_pending_queue_keeps_arrival_order_and_work_total():
    queue = PendingQueue()
    a, b, c = req(0, arrival=1.0), req(1, prompt=30, arrival=3.0), req(2, arrival=9.0, pinned=True)
    queue.push_back(a)
    queue.push_back(b)
    queue.push_front(c)  # resumed: next, whatever its age
    assert ids(queue) == ["r2", "r0", "r1"]
    assert queue.total_work == 20 + 40 + 20
    stolen = req(3, arrival=2.0)  # waited since 2.0 at its origin: between r0 and r1
    queue.insert_by_arrival(stolen)
    assert ids(queue) == ["r2", "r0", "r3", "r1"]
    queue.insert_by_arrival(req(4, arrival=3.0))  # a tie goes after those already here
    assert ids(queue) == ["r2", "r0", "r3", "r1", "r4"]
    queue.insert_by_arrival(req(5, arrival=0.5))  # older than all, but never ahead of the resumed one
    assert ids(queue) == ["r2", "r5", "r0", "r3", "r1", "r4"]
    queue.remove(queue.head())  # type: ignore[arg-type]
    queue.insert_by_arrival(c)  # once gone from the front, it is placed by its age like any other
    assert ids(queue) == ["r5", "r0", "r3", "r1", "r4", "r2"]
    queue.remove(c)
    queue.remove(queue.head())  # type: ignore[arg-type]
    assert queue.grantable()[0] is a and len(queue.grantable()) == 4
    assert queue.grantable(after=1) == queue.grantable()[1:]  # the head is kept (its slot frees now)
    queue.remove(a)
    assert queue.pop_front() is stolen and queue.head() is b and queue.total_work == 40 + 20
