"""`python -m bench.kv_fp8_accuracy` runs and prints one row per model."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_fp8_accuracy_bench_prints_a_row_per_model():
    proc = subprocess.run([sys.executable, "-m", "bench.kv_fp8_accuracy", "--models", "tiny", "--prompts", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1 and rows[0].count("top-1") == 3


def test_the_fp8_accuracy_bench_refuses_an_unknown_model_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "bench.kv_fp8_accuracy", "--models", "gpt-9"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown preset" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
