"""The simulator's membership changes (a node joins, a node leaves) and its record of where each
request's wait went: components that add up, a case worked by hand, and idle slots."""

from __future__ import annotations

import dataclasses
import math

import pytest

from bench.balance.simulate import (
    MODES,
    WARM_UP_S,
    ClusterSpec,
    RunResult,
    simulate,
)
from bench.balance.waits import WaitRecord, decompose, format_decomposition, overtaken
from bench.balance.workload import Item, WorkloadSpec, generate, sim_capacity_rps
from p2psched.node import MEMBERS_EVERY, PROBE_INTERVAL_S, TICK_S


def busy_items(work: WorkloadSpec, nodes: int, load: float = 0.95) -> list[Item]:
    spec = ClusterSpec(nodes=nodes)
    return generate(work.at_rate(load * sim_capacity_rps(spec.cost, spec.max_num_seqs, work, nodes)), nodes)


def admitted_s(wait: WaitRecord) -> float:
    assert wait.queued_s is not None
    return wait.arrival_s + wait.queued_s


# ---- membership ----


def test_membership_changes_are_checked():
    with pytest.raises(ValueError):
        ClusterSpec(nodes=3, joins=((3, 1.0),))  # node 3 is not one of the three
    with pytest.raises(ValueError):
        ClusterSpec(nodes=3, leaves=((1, 1.0), (1, 2.0)))
    with pytest.raises(ValueError):
        ClusterSpec(nodes=3, joins=((2, 5.0),), leaves=((2, 4.0),))  # leaves before it joins
    with pytest.raises(ValueError):
        ClusterSpec(nodes=2, leaves=((0, 1.0), (1, 1.0)))  # nobody stays
    assert ClusterSpec(nodes=3, joins=((2, 5.0),), leaves=((1, 4.0),)).join_time(2) == 5.0


@pytest.fixture(scope="module")
def joined() -> tuple[float, RunResult]:
    """Three busy nodes; node 3 joins half-way through (the front door's rotation takes it in)."""
    work = WorkloadSpec(num_requests=800, seed=3, join_at=400)
    items = busy_items(work, 3)
    join_s = items[400].arrival_s
    spec = ClusterSpec(nodes=4, joins=((3, join_s),))
    return join_s, simulate(spec, "global", items)


def test_a_joiner_is_invisible_before_its_time(joined: tuple[float, RunResult]):
    join_s, result = joined
    node = result.nodes["node3"]
    assert node.joined_s == join_s
    assert node.first_probe_s is not None and node.first_probe_s >= join_s
    assert node.first_probed_s is not None and node.first_probed_s >= join_s  # peers learn of it only then
    assert node.first_steal_s is not None and node.first_steal_s >= join_s
    mine = [w for w in result.waits if w.served_by == "node3"]
    assert mine and all(w.started_s is not None and w.started_s >= join_s for w in mine)
    assert result.busy_fraction["node3"] > 0


def test_a_joiner_runs_its_own_requests_and_steals(joined: tuple[float, RunResult]):
    _, result = joined
    assert result.summary["failed"] == 0
    mine = [w for w in result.waits if w.served_by == "node3"]
    assert any(w.origin == "node3" for w in mine)
    assert any(w.is_stolen and w.origin != "node3" for w in mine)  # it took work from its peers


@pytest.mark.parametrize("mode", ["local", "fastdeploy", "oracle"])
def test_no_mode_gives_a_joiner_work_before_it_joins(mode: str, joined: tuple[float, RunResult]):
    join_s, _ = joined
    items = busy_items(WorkloadSpec(num_requests=800, seed=3, join_at=400), 3)
    result = simulate(ClusterSpec(nodes=4, joins=((3, join_s),)), mode, items)  # type: ignore[arg-type]
    assert result.summary["failed"] == 0
    mine = [w for w in result.waits if w.served_by == "node3"]
    assert mine and min(admitted_s(w) for w in mine) >= join_s


def test_a_leaver_drains_what_it_holds_and_its_peers_take_its_queue():
    """Node 1 gets six 10-token requests at t = 0 (one slot per node, 20 ms steps). Nodes 0 and
    2 are idle and each steal one at their first probe round; node 1 runs r0 and holds r3..r5
    when it leaves at 50 ms. As ``Node._shutdown`` does, it takes no stolen work and stops
    probing, but its queue stays grantable to peers that still count it a member: at ~0.2 s,
    when the three running requests have one token left, node 1 keeps r3 for its own freeing slot
    and nodes 0 and 2 take r4 and r5 just in time, so all three start at ~0.2 s (without the
    steals r5 would start at 0.6 s). Node 1 exits at its first tick after r3 ends (0.4 s). Idle
    node 2 keeps probing it until its next member read (at 1.03 s: its phase, plus every
    MEMBERS_EVERY heartbeats), then never again, though the run goes on (r6, 4 s long, from
    0.9 s on node 0)."""
    spec = ClusterSpec(nodes=3, max_num_seqs=1, leaves=((1, 0.05),))
    items = [Item(i, 0.0, 1, 8, 10) for i in range(6)] + [Item(6, 0.9, 0, 8, 200)]
    result = simulate(spec, "global", items)
    assert result.summary["failed"] == 0
    waits = {w.index: w for w in result.waits}
    assert [waits[i].served_by for i in range(6)].count("node1") == 2
    assert {waits[1].served_by, waits[2].served_by} == {waits[4].served_by, waits[5].served_by} == {"node0", "node2"}
    assert waits[3].served_by == "node1" and waits[3].started_s == pytest.approx(0.2)
    assert all(0.2 <= waits[i].started_s < 0.22 for i in (4, 5))  # type: ignore[operator]
    assert waits[6].served_by == "node0" and result.records[6].finish_s == pytest.approx(4.9)
    node = result.nodes["node1"]
    assert node.left_s == 0.05
    assert node.gone_s is not None and 0.4 <= node.gone_s <= 0.4 + TICK_S
    assert node.last_probe_s is not None and node.last_probe_s < 0.05  # it stopped probing
    node2_read = 2 * TICK_S / 3 - WARM_UP_S + 2 * MEMBERS_EVERY * spec.heartbeat_interval
    assert node2_read == pytest.approx(1.0333, abs=1e-4)
    assert node.last_probed_s is not None
    assert node2_read - PROBE_INTERVAL_S < node.last_probed_s <= node2_read + 2 * spec.redis_latency_s


@pytest.mark.parametrize("mode", MODES)
def test_a_leaver_in_a_busy_cluster(mode: str):
    """Node 1 leaves half-way (the front door stops sending it requests then): every request
    completes; what it starts afterwards is only what it already held (its own queue; in
    FastDeploy, what its insert loop had popped just before)."""
    work = WorkloadSpec(num_requests=800, seed=4, leave_at=400, leaver=1)
    items = busy_items(work, 3)
    leave_s = items[400].arrival_s
    result = simulate(ClusterSpec(nodes=3, leaves=((1, leave_s),)), mode, items)  # type: ignore[arg-type]
    assert result.summary["failed"] == 0
    node = result.nodes["node1"]
    assert node.gone_s is not None and node.gone_s >= leave_s
    late = [w for w in result.waits if w.served_by == "node1" and admitted_s(w) >= leave_s]
    assert all(w.arrival_s < leave_s for w in late)
    if mode in ("local", "global"):
        assert all(w.origin == "node1" for w in late)
    if mode == "oracle":
        assert late == []
    if mode == "fastdeploy":
        assert all(admitted_s(w) < leave_s + 0.05 for w in late)
    if mode == "global":
        assert node.last_steal_s is None or node.last_steal_s < leave_s
        assert node.last_probe_s is not None and node.last_probe_s < leave_s


def test_a_node_that_joins_and_another_that_leaves_change_nothing_else():
    """Without membership changes the simulator is what it was: same records, same counters."""
    items = busy_items(WorkloadSpec(num_requests=300, seed=2), 3, load=0.9)
    plain = simulate(ClusterSpec(nodes=3), "global", items)
    again = simulate(ClusterSpec(nodes=3, joins=(), leaves=()), "global", items)
    assert [(r.served_by, r.token_times) for r in plain.records] == [(r.served_by, r.token_times)
                                                                      for r in again.records]
    assert dataclasses.asdict(plain.counters) == dataclasses.asdict(again.counters)


# ---- where the waits went ----


@pytest.fixture(scope="module")
def busy_global() -> RunResult:
    return simulate(ClusterSpec(nodes=4), "global", busy_items(WorkloadSpec(num_requests=800, seed=1), 4, 0.9))


def test_the_parts_of_every_wait_add_up_to_its_ttft(busy_global: RunResult):
    spec = ClusterSpec()
    stolen = [w for w in busy_global.waits if w.is_stolen]
    assert len(stolen) > 50
    for w in stolen:
        assert w.unnoticed_s is not None and w.decide_s is not None and w.round_trip_s is not None
        assert w.to_first_token_s is not None and w.ttft_s is not None
        assert min(w.unnoticed_s, w.decide_s, w.round_trip_s, w.to_first_token_s) >= 0
        assert w.grant_size >= 1
        # its first token reaches the origin one hop after the thief's engine made it
        total = w.unnoticed_s + w.decide_s + w.round_trip_s + w.to_first_token_s
        assert total == pytest.approx(w.ttft_s - spec.latency_s, abs=1e-9)
    for w in busy_global.waits:
        assert w.ttft_s is not None and w.wait_s is not None and w.queued_s is not None
        assert w.step_wait_s is not None and w.first_step_s is not None and w.delivery_s is not None
        assert w.queued_s + w.step_wait_s == pytest.approx(w.wait_s, abs=1e-9)
        assert w.wait_s + w.first_step_s + w.delivery_s == pytest.approx(w.ttft_s, abs=1e-9)
        assert 0 <= w.idle_slot_wait_s <= w.queued_s + 1e-9


def test_the_decomposition_means_add_up_to_the_mean_ttft(busy_global: RunResult):
    d = decompose(busy_global.mode, busy_global.waits)
    assert d["stolen"]["count"] == sum(1 for w in busy_global.waits if w.is_stolen)
    for group in ("all", "tail"):
        assert sum(d[group]["parts"].values()) == pytest.approx(d[group]["ttft_s"], abs=1e-9)
    assert d["tail"]["count"] == 8  # the slowest 1% of 800
    assert d["idle_slot"]["count"] == sum(1 for w in busy_global.waits if w.idle_slot_wait_s > 1e-9)
    lines = format_decomposition(d)
    assert all(line.startswith("|") for line in lines if line)
    assert any("steal round trip" in line for line in lines)


HAND = ClusterSpec(nodes=2, max_num_seqs=1, latency_s=0.001, redis_latency_s=0.0)


def test_a_stolen_request_worked_by_hand():
    """r0 (t = 0) and r1 (t = 2 ms) go to node 0, which has one slot; node 1 is idle. Node 1's
    probe rounds fall every PROBE_INTERVAL_S from its phase (warm-up start, its tick offset, half
    an interval): the first at or after 2 ms is R = 15 ms. Its probe reaches node 0 at R + L
    (L = 1 ms one way), whose answer (r1 waits) reaches node 1 at R + 2L: noticed. Node 1 steals
    at once; the grant is back at R + 4L; r1 starts there on an idle engine and its first token,
    a 20 ms step later, reaches node 0 at R + 5L + 20 ms."""
    lat, step, arrival = HAND.latency_s, HAND.cost.decode_step_ms / 1000, 0.002
    phase = TICK_S / 2 - WARM_UP_S + PROBE_INTERVAL_S / 2
    probe_round = phase + PROBE_INTERVAL_S * math.ceil((arrival - phase) / PROBE_INTERVAL_S)
    assert probe_round == pytest.approx(0.015)
    result = simulate(HAND, "global", [Item(0, 0.0, 0, 8, 100), Item(1, arrival, 0, 8, 100)])
    r0, r1 = result.waits
    assert (r0.served_by, r0.is_stolen, r0.wait_s, r0.idle_slot_wait_s) == ("node0", False, 0.0, 0.0)
    assert r0.ttft_s == pytest.approx(step)
    assert (r1.served_by, r1.is_stolen, r1.grant_size) == ("node1", True, 1)
    assert r1.unnoticed_s == pytest.approx(probe_round + 2 * lat - arrival)  # 15 ms
    assert r1.decide_s == pytest.approx(0.0)
    assert r1.round_trip_s == pytest.approx(2 * lat)
    assert r1.to_first_token_s == pytest.approx(step)
    assert r1.ttft_s == pytest.approx(probe_round + 5 * lat + step - arrival)  # 38 ms
    assert r1.delivery_s == pytest.approx(lat)
    # node 1's slot sat free from r1's arrival until the grant reached it
    assert r1.queued_s == pytest.approx(probe_round + 4 * lat - arrival)
    assert r1.idle_slot_wait_s == pytest.approx(r1.queued_s)
    d = decompose(result.mode, result.waits)
    assert d["stolen"]["count"] == 1
    assert d["stolen"]["unnoticed_s"]["mean"] == pytest.approx(0.015)
    assert d["tail"]["stolen"] == 1  # the slowest 1% of two: r1


def three_to_node0() -> list[Item]:
    """Three 10-token requests at t = 0 to node 0 (one slot per node, 20 ms steps)."""
    return [Item(i, 0.0, 0, 8, 10) for i in range(3)]


def test_the_pooled_queue_never_waits_beside_a_free_slot_and_local_does():
    """Local: r1 waits 0.2 s and r2 0.4 s for node 0 while node 1 sits idle. The oracle starts r1
    on node 1 at once; r2 waits 0.2 s, but while every slot is taken."""
    spec = ClusterSpec(nodes=2, max_num_seqs=1, latency_s=0.0, redis_latency_s=0.0)
    local = simulate(spec, "local", three_to_node0())
    oracle = simulate(spec, "oracle", three_to_node0())
    assert [w.idle_slot_wait_s for w in local.waits] == pytest.approx([0.0, 0.2, 0.4])
    assert [w.idle_slot_wait_s for w in oracle.waits] == [0.0, 0.0, 0.0]
    assert [w.queued_s for w in oracle.waits] == pytest.approx([0.0, 0.0, 0.2])
    assert decompose(local.mode, local.waits)["idle_slot"] == pytest.approx({"count": 2, "mean_s": 0.3, "p99_s": 0.398,
                                                           "sum_s": 0.6})
    assert decompose(oracle.mode, oracle.waits)["idle_slot"]["count"] == 0


def test_oracle_has_no_idle_slot_waits_in_a_busy_run():
    items = busy_items(WorkloadSpec(num_requests=600, seed=5), 4, 0.95)
    result = simulate(ClusterSpec(nodes=4), "oracle", items)
    assert max(w.idle_slot_wait_s for w in result.waits) < 1e-9
    assert set(overtaken(result.waits).values()) == {0}  # arrival order, as a pooled queue starts them


def test_overtaken_counts_younger_requests_that_took_a_slot_first():
    def wait(index: int, arrival: float, queued: float) -> WaitRecord:
        return WaitRecord(index, "n0", "n0", arrival, arrival + queued, queued, queued, queued, 0.0, 0.0, 0.0, 0.0)

    # r0 arrives first but takes a slot last; r1 before r2 in both orders
    waits = [wait(0, 0.0, 1.0), wait(1, 0.1, 0.2), wait(2, 0.2, 0.3)]
    assert overtaken(waits) == {0: 2, 1: 0, 2: 0}
