"""`make gpu-check` must work the first time it meets a GPU: run the whole script on CPU
(tiny sizes, kernels interpreted, a real two-node cluster) and check its table."""

import json
import subprocess
import sys


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    sections = {r[0] for r in rows}
    assert sections == {"machine", "tests", "correct", "speed", "engine", "cluster"}
    assert not any("FAIL" in r[3] for r in rows)
    assert "| section | measurement | value | reference / verdict |" in proc.stdout
