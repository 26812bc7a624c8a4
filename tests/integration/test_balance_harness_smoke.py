"""``python -m bench`` end to end on a small workload (every request to node 0, so that node 1
works only if it steals): real node processes in every mode, the client-side oracle, the
FastDeploy baseline's schedulers, the simulated twins, and what it writes."""

import json
import subprocess
import sys

from bench.balance.harness import Setup

REQUESTS = 24


def test_the_balance_bench_runs_every_mode_and_writes_its_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--nodes", "2", "--requests", str(REQUESTS),
                           "--decode-step-ms", "5", "--target", "one_node", "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    _, items, _ = Setup(nodes=2, decode_step_ms=5.0, num_requests=REQUESTS, target="one_node").workload()
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
