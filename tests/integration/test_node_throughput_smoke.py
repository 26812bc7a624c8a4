"""``python -m bench.node_throughput`` end to end on a tiny sim workload: a real node process,
the multi-process streaming client, the in-process engine, the table, the JSON and the plot."""

import json
import subprocess
import sys

REQUESTS, MAX_TOKENS = 16, 8


def test_node_throughput_runs_every_phase(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.node_throughput", "--engine", "sim", "--seqs", "4",
                           "--requests", str(REQUESTS), "--max-tokens", str(MAX_TOKENS), "--client-procs", "2",
                           "--out", str(tmp_path)], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["seqs"], r["phase"]): r for r in results["runs"]}
    assert set(runs) == {(4, "engine"), (4, "new")}
    for run in runs.values():
        assert (REQUESTS, 0, 0) == (run["succeeded"], run["failed"], run["short"])
        assert REQUESTS * MAX_TOKENS == run["completion_tokens"]
        assert run["tokens_per_s"] > 0
    node = runs[(4, "new")]
    assert node["ttft_p50_s"] is not None and node["inter_chunk_p50_ms"] is not None
    assert [4] == [row["seqs"] for row in results["summary"]]
    assert "| seqs | engine alone tok/s | node tok/s | node/engine |" in proc.stdout
    assert (tmp_path / "node_throughput.png").stat().st_size > 0
