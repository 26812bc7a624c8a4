"""`python -m bench.kernel_asm` (what the attention kernel compiles to on sm_90) runs on CPU and
prints a row per autotune candidate."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_kernels_compile import sm90_toolchain_missing

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_asm_prints_a_row_per_candidate():
    missing = sm90_toolchain_missing()
    if missing:
        pytest.skip(missing)
    from kernels.paged_attention import DECODE_CONFIGS, PREFILL_CONFIGS

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.kernel_asm"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith(("| decode", "| prefill"))]
    assert [(r[0].strip(), tuple(int(x) for x in r[1].split(","))) for r in rows] == \
        [("decode", c) for c in DECODE_CONFIGS] + [("prefill", c) for c in PREFILL_CONFIGS]
    buffers = {tuple(int(x) for x in r[1].split(",")): int(r[3]) for r in rows if r[0].strip() == "decode"}
    assert all(buffers[c] >= c[2] - 1 for c in DECODE_CONFIGS)
