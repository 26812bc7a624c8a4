import dataclasses
from pathlib import Path
import subprocess
import sys

import pytest

from p2psched.config import NodeConfig, SchedulerConfig
from p2psched.errors import ConfigError
from p2psched.server import build_parser, config_from_args


@pytest.mark.parametrize("changes, message", [
    ({"port": 0}, "scheduler port"),
    ({"topic": "a{b}"}, "topic"),
    ({"ttl": 0}, "ttl"),
    ({"min_load_score": 0}, "min load score"),
    ({"load_shards_num": 0}, "load shards"),
    ({"lease_timeout": -1}, "lease timeout"),
])
def test_bad_scheduler_values_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(SchedulerConfig(), **changes)


def test_fastdeploy_flags_map_onto_the_config():
    args = build_parser().parse_args([
        "--port", "8801", "--scheduler-name", "global", "--scheduler-ttl", "900", "--scheduler-host", "127.0.0.1",
        "--scheduler-port", "6379", "--scheduler-db", "0", "--scheduler-password", "", "--scheduler-topic",
        "default", "--scheduler-min-load-score", "3", "--scheduler-load-shards-num", "1"])
    cfg = config_from_args(args)
    assert cfg.port == 8801 and cfg.scheduler.is_global and cfg.scheduler.ttl == 900.0
    assert cfg.scheduler == SchedulerConfig(name="global", ttl=900.0, min_load_score=3)
    assert isinstance(cfg, NodeConfig)


@pytest.mark.parametrize("flags", [["--scheduler-port", "70000"], ["--max-num-seqs", "0"],
                                   ["--scheduler-load-shards-num", "x"], ["--engine", "gpt"],
                                   ["--cuda-graphs", "--device", "cpu"]])
def test_bad_cli_values_exit_2_with_one_line(flags):
    proc = subprocess.run([sys.executable, "-m", "p2psched.server", *flags], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "error:" in proc.stderr.strip().splitlines()[-1]


def test_every_flag_is_documented():
    flags = {opt for action in build_parser()._actions for opt in action.option_strings if opt.startswith("--")}
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    missing = sorted(f for f in flags - {"--help"} if f"`{f}`" not in doc)
    assert not missing, f"not in docs/configuration.md: {missing}"
    assert len(flags) > 30


def test_cli_errors_are_exactly_one_line():
    proc = subprocess.run([sys.executable, "-m", "p2psched.server", "--port", "nope"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--port" in proc.stderr


@pytest.mark.parametrize("requested, device, head_dim, graphs, expected", [
    ("auto", "cpu", 64, False, "torch"),
    ("auto", "cuda", 64, False, "triton"),
    ("auto", "cuda:1", 128, True, "triton"),
    ("auto", "cuda", 96, False, "torch"),  # not a power of two: the reference serves it
    ("torch", "cuda", 64, False, "torch"),
    ("triton", "cuda", 96, False, ConfigError),
    ("auto", "cuda", 80, True, ConfigError),  # graphs need the kernels
])
def test_the_attention_backend_follows_device_and_head_dim(requested, device, head_dim, graphs, expected):
    from p2psched.server import attention_backend_for

    if expected is ConfigError:
        with pytest.raises(ConfigError, match=f"this model's is {head_dim}"):
            attention_backend_for(requested, device, head_dim, graphs)
    else:
        assert attention_backend_for(requested, device, head_dim, graphs) == expected
