"""``--model owner/name`` on the command line: a hub id missing from the Hugging Face cache is one
line and exit 2, as a bad model directory is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("hub_env", [{}, {"HF_HUB_OFFLINE": "1", "HF_HUB_VERBOSITY": "debug"}],
                         ids=["plain", "offline-debug-logging"])
def test_a_hub_id_missing_from_the_cache_is_a_one_line_error(tmp_path, hub_env):
    """huggingface_hub reads HF_HUB_CACHE when the process imports it; its offline mode and its
    most verbose logging add nothing after our line."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), **hub_env}
    proc = subprocess.run([sys.executable, "-m", "p2psched.server", "--model", "baidu/ERNIE-4.5-0.3B-Paddle"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"python -m p2psched.server: error: model 'baidu/ERNIE-4.5-0.3B-Paddle' is not in the Hugging Face cache "
        f"(looked in {tmp_path / 'hub' / 'models--baidu--ERNIE-4.5-0.3B-Paddle'}); download it with "
        f"`hf download baidu/ERNIE-4.5-0.3B-Paddle` or pass a directory")
