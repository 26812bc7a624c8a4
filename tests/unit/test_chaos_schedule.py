"""The chaos plan: seeded, replayable from its JSON, every fault kind drawn."""

from __future__ import annotations

import json
from pathlib import Path

from bench.chaos_schedule import (
    FAULT_KINDS,
    LINK_KINDS,
    NODE_KINDS,
    POINTS,
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
