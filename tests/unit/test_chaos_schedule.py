"""The chaos plan: seeded, replayable from its JSON, every fault kind drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.chaos_checker import LAPSE_SLACK_S
from bench.chaos_schedule import (
    BATCH,
    FAULT_KINDS,
    LINK_KINDS,
    LONG_TAIL_S,
    NODE_ARGS,
    NODE_KINDS,
    ODD_NODE_ARGS,
    POINTS,
    STALL_KINDS,
    STOP_KINDS,
    VARIANTS,
    ChaosPlan,
    make_plan,
    make_workload,
)


def test_the_same_seed_gives_the_same_plan_and_workload() -> None:
    assert make_plan(7) == make_plan(7)
    assert make_workload(make_plan(7)) == make_workload(make_plan(7))
    assert make_plan(7).faults != make_plan(8).faults


def test_a_saved_schedule_replays_the_same_plan(tmp_path: Path) -> None:
    plan = make_plan(3, num_requests=50, num_faults=6)
    path = tmp_path / "schedule.json"
    plan.save(path)
    assert json.loads(path.read_text())["faults"][0]["kind"] in FAULT_KINDS
    again = ChaosPlan.load(path)
    assert again == plan
    assert make_workload(again) == make_workload(plan)


def test_every_kind_is_drawn_in_time_order_inside_the_send_window() -> None:
    plan = make_plan(5, num_requests=600, num_faults=24)
    kinds = [f.kind for f in plan.faults]
    assert set(kinds) == set(FAULT_KINDS) and len(kinds) == 24
    assert {(f.kind, f.point) for f in plan.faults} == set(VARIANTS)  # every kind at every point
    times = [f.at_s for f in plan.faults]
    assert times == sorted(times) and 0 < times[0] and times[-1] < plan.send_window_s
    assert [f.fault_id for f in plan.faults] == list(range(24))


def test_durations_and_targets_fit_their_kinds() -> None:
    faults = [f for seed in range(20) for f in make_plan(seed, num_requests=100, num_faults=10).faults]
    stops = [f.duration_s for f in faults if f.kind in STOP_KINDS]
    assert any(d < 1.0 for d in stops) and any(d > 1.0 for d in stops)  # around the 1 s lease timeout
    for fault in faults:
        assert (fault.node is not None) == (fault.kind in LINK_KINDS)
        assert (fault.point in POINTS) if fault.kind in NODE_KINDS else fault.point == ""
        if fault.kind == "link_delay":
            assert 1.0 <= fault.delay_ms <= 20.0
        if fault.kind == "link_cut":
            assert 0.5 <= fault.duration_s <= 3.0


def test_traffic_is_skewed_so_stealing_happens() -> None:
    specs = make_workload(make_plan(1, num_requests=600, num_faults=0))
    per_node = [sum(1 for s in specs if s.node == n) for n in range(4)]
    assert per_node[0] > per_node[1] > per_node[3] and per_node[0] > 600 * 0.4
    assert any(len(s.prompt_token_ids) >= 400 for s in specs)  # long prefills exist
    assert [s.send_at_s for s in specs] == sorted(s.send_at_s for s in specs)


def test_the_default_cluster_has_one_short_slow_node_a_ttl_and_engines_that_stall() -> None:
    plan = make_plan(7)
    assert plan.contexts == {"node0": 4096, "node1": 4096, "node2": 4096, "node3": 1024}
    assert plan.per_node_args == [[], [], [], ODD_NODE_ARGS]
    assert plan.args_of(3)[-4:] == ["--sim-max-model-len", "1024", "--sim-decode-step-ms", "20"]
    assert plan.ttl_s == 8.0
    # A stall outlasts the lease lapse (heartbeats stop 1 lease timeout in, the lease lapses 1 later) with room.
    assert plan.stall_s == 3 * plan.lease_timeout > 2 * plan.lease_timeout + LAPSE_SLACK_S
    stalls = [f for f in plan.faults if f.kind in STALL_KINDS]
    assert stalls and all(f.duration_s == plan.stall_s for f in stalls)


def test_stalls_are_drawn_only_for_nodes_that_survive_sigusr1() -> None:
    no_stall = [a for k, a in enumerate(NODE_ARGS) if a != "--sim-stall-s" and NODE_ARGS[k - 1] != "--sim-stall-s"]
    plan = make_plan(7, num_faults=40, node_args=no_stall)
    assert plan.stall_s == 0 and not any(f.kind in STALL_KINDS for f in plan.faults)
    with pytest.raises(ValueError, match="sim-stall-s"):
        ChaosPlan(7, node_args=no_stall, faults=make_plan(7).faults)


def test_requests_go_only_where_they_fit_except_door_probes() -> None:
    for seed in range(6):
        plan = make_plan(seed, num_requests=600, num_faults=0)
        contexts = list(plan.contexts.values())
        specs = make_workload(plan)
        probes = [s for s in specs if s.is_door_probe]
        assert probes and all(s.node == 3 and s.context_tokens > contexts[3] for s in probes)
        assert all(s.context_tokens <= contexts[s.node] for s in specs if not s.is_door_probe)
        assert max(s.context_tokens for s in specs) <= 1620  # about 1,600 at most, on the long-context nodes
        assert any(s.context_tokens > contexts[3] for s in specs)  # the short node's limit matters


def test_long_requests_outlive_the_ttl_and_queue_last_in_a_batch_off_the_busiest_node() -> None:
    plan = make_plan(3, num_requests=600, num_faults=0)
    specs = make_workload(plan)
    longs = [s for s in specs if s.max_tokens >= 700]
    assert len(longs) >= 10
    # 20 ms a token on the slow node, 10 ms elsewhere: some run past the TTL wherever they run.
    assert any(s.context_tokens <= 1024 and s.max_tokens * 0.020 > plan.ttl_s for s in longs)
    assert any(s.max_tokens * 0.010 > plan.ttl_s for s in longs)
    for spec in longs:
        batch = specs[spec.index - BATCH + 1:spec.index + 1]
        assert [s.send_at_s for s in batch] == [spec.send_at_s] * BATCH  # sent at one instant ...
        assert all(s.max_tokens < 700 for s in batch[:-1])  # ... behind short ones
        assert spec.node != 0 and spec.send_at_s <= plan.send_window_s - LONG_TAIL_S
    assert len(specs) == 600 and [s.index for s in specs] == list(range(600))


def test_a_schedule_of_another_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "schedule.json"
    make_plan(3, num_requests=50, num_faults=6).save(path)
    data = json.loads(path.read_text())
    data["version"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 1"):
        ChaosPlan.load(path)
