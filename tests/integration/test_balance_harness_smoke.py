"""``python -m bench`` end to end on a small workload (every request to node 0, so that node 1
works only if it steals): real node processes in every mode, the client-side oracle, the
FastDeploy baseline's schedulers, the simulated twins, and what it writes."""

import json
import subprocess
import sys

from bench.balance.fastdeploy import BLPOP_REQUEST_TIMEOUT_S
from bench.balance.harness import Setup

REQUESTS = 24


def test_the_balance_bench_runs_every_mode_and_writes_its_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--nodes", "2", "--requests", str(REQUESTS),
                           "--decode-step-ms", "5", "--target", "one_node", "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    # the capacity was measured first: 2 nodes, 5 ms steps, a step a little longer than the flag
    assert all(5.0 <= ms < 20.0 for ms in results["capacity_step_ms"]), results["capacity_step_ms"]
    setup = Setup(nodes=2, decode_step_ms=5.0, num_requests=REQUESTS, target="one_node")
    assert 0.6 * setup.model_capacity() < results["capacity_rps"] <= setup.model_capacity()
    _, items = setup.workload(results["capacity_rps"])
    assert set(results["modes"]) == {"local", "global", "fastdeploy", "oracle"}
    for mode, result in results["modes"].items():
        assert result["real"]["completed"] == REQUESTS and result["real"]["failed"] == 0, mode
        assert result["sim"]["completed"] == REQUESTS, mode
        records = {r["index"]: r for r in result["records"]}
        for item in items:  # every stream whole: exactly the tokens it asked for (the sim engine never stops early)
            assert records[item.index]["num_tokens"] == item.max_tokens, (mode, item.index)
            assert records[item.index]["served_by"] in ("node0", "node1")
    assert results["modes"]["local"]["real"]["served_elsewhere"] == 0  # no stealing: all on node0
    assert results["modes"]["global"]["real"]["served_elsewhere"] > 0  # node1 had work only by stealing
    assert results["modes"]["local"]["redis_commands"] == 0  # local nodes never touch Redis
    fastdeploy = results["modes"]["fastdeploy"]
    assert fastdeploy["redis_commands"] >= REQUESTS * 10  # every request through Redis: RPUSH, ZINCRBY, LPOP, ...
    report = (tmp_path / "report.md").read_text()
    assert report.count("| real |") == 4 and report.count("| sim |") == 4
    for name in ("latency_cdf.png", "timeline_local.png", "timeline_global.png", "timeline_fastdeploy.png",
                 "timeline_oracle.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_a_node_joins_and_one_leaves_mid_run_in_every_mode(tmp_path):
    """3 nodes; node 3 joins when a third of the requests have arrived, node 1 leaves (SIGTERM)
    at two thirds. Nothing is lost; the joiner serves only after it joined, the leaver starts
    nothing after it left, and the front door routes around both."""
    requests = 36
    proc = subprocess.run([sys.executable, "-m", "bench", "--nodes", "3", "--requests", str(requests),
                           "--decode-step-ms", "5", "--join-at", "0.34", "--leave-at", "0.67",
                           "--capacity-rps", "30", "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    setup = Setup(nodes=3, decode_step_ms=5.0, num_requests=requests, join_at=0.34, leave_at=0.67)
    _, items = setup.workload(30.0)
    join_at, leave_at = setup.work_spec().join_at, setup.work_spec().leave_at
    assert (join_at, leave_at) == (12, 24)
    assert {item.node for item in items[:join_at]} == {0, 1, 2}
    assert 3 in {item.node for item in items[join_at:]} and 1 not in {item.node for item in items[leave_at:]}
    for mode, result in results["modes"].items():
        assert result["real"]["completed"] == requests and result["real"]["failed"] == 0, mode
        assert result["sim"]["completed"] == requests, mode
        [(joiner, joined_s)] = result["joins"]
        [(leaver, left_s)] = result["leaves"]
        assert (joiner, leaver) == (3, 1) and left_s == items[leave_at].arrival_s, mode
        assert joined_s <= items[join_at].arrival_s + 5, mode  # started 3 s early; up within a few seconds
        served = {r["index"]: r for r in result["records"]}
        for r in served.values():
            started = r["token_times"][0]
            if r["served_by"] == "node3":
                assert started >= joined_s, (mode, r["index"])
            if r["served_by"] == "node1":  # nothing new but a steal in flight (FastDeploy's: a blocking pop)
                late = BLPOP_REQUEST_TIMEOUT_S + 0.1 if mode == "fastdeploy" else 0.05
                assert r["arrival_s"] < left_s + late, (mode, r["index"])
        if mode != "oracle":  # (the oracle fills the lowest-numbered node with a free slot first)
            assert any(r["served_by"] == "node3" for r in served.values()), mode
