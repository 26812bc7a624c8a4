"""`make gpu-check` must work the first time it meets a GPU: run the whole script on CPU
(tiny sizes, kernels interpreted, a real two-node cluster) and check its table. The "before"
section runs the speed rows again on the kernels/ of a baseline folder (here a copy of this
tree's, as `make gpu-baseline` would extract an older revision's)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    baseline = tmp_path / "baseline"
    shutil.copytree(ROOT / "kernels", baseline / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (baseline / "REV").write_text("copy\n")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--json", str(out),
                           "--baseline", str(baseline)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    sections = {r[0] for r in rows}
    assert sections == {"machine", "tests", "correct", "speed", "before", "engine", "cluster"}
    assert not any("FAIL" in r[3] for r in rows)
    speed = [r[1] for r in rows if r[0] == "speed" and r[1].startswith(("prefill", "decode"))]
    assert [r[1] for r in rows if r[0] == "before" and r[1].startswith(("prefill", "decode"))] == \
        [f"{what} [copy]" for what in speed]
    assert "| section | measurement | value | reference / verdict |" in proc.stdout
