import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2psched.core.config import NodeConfig, SchedulerConfig
from p2psched.core.errors import ConfigError
from p2psched.core.flags import config_fields, flag
from p2psched.server import build_parser, config_from_args, main
from server.engine_config import EngineConfig

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"

# The flags of `python -m p2psched.server` before they were generated from the configs (issue 10):
# tests, docs, benches and p2psched/cluster.py use them, and so may launch scripts.
OLD_FLAGS = {
    "--host", "--advertise-host", "--port", "--metrics-port", "--max-concurrent-requests", "--steal-port",
    "--result-port", "--advertise-steal-port", "--advertise-result-port", "--curve-key-file", "--curve-allow-dir",
    "--node-name", "--engine", "--model", "--device", "--dtype", "--max-num-seqs", "--max-num-batched-tokens",
    "--kv-cache-blocks", "--kv-cache-memory-fraction", "--block-size", "--max-model-len", "--min-step-ms",
    "--attention-backend", "--cuda-graphs", "--use-cudagraph", "--cpu-threads", "--max-queue-len", "--log-level",
    "--scheduler-name", "--scheduler-host", "--scheduler-port", "--scheduler-db", "--scheduler-username",
    "--scheduler-password", "--scheduler-password-file", "--scheduler-tls", "--scheduler-tls-ca-file",
    "--scheduler-tls-cert-file", "--scheduler-tls-key-file", "--scheduler-topic", "--scheduler-ttl",
    "--scheduler-min-load-score", "--scheduler-load-shards-num", "--heartbeat-interval", "--lease-timeout",
    "--steal-timeout", "--sim-decode-step-ms", "--sim-decode-ms-per-seq", "--sim-prefill-ms-per-token",
    "--sim-kv-tokens", "--sim-max-model-len", "--sim-stall-s",
}

# (command line, the settings it changes from the defaults): together they use every flag.
ROUND_TRIPS: list[tuple[list[str], dict[str, Any]]] = [
    (["--host", "127.0.0.1"], {"host": "127.0.0.1"}),
    (["--advertise-host", "10.0.0.7"], {"advertise_host": "10.0.0.7"}),
    (["--port", "8801"], {"port": 8801}),
    (["--metrics-port", "8802"], {"metrics_port": 8802}),
    (["--engine-worker-queue-port", "8803,8804"], {"engine_worker_queue_port": "8803,8804"}),
    (["--max-concurrent-requests", "64"], {"max_concurrent_requests": 64}),
    (["--steal-port", "7001"], {"steal_port": 7001}),
    (["--result-port", "7002"], {"result_port": 7002}),
    (["--advertise-steal-port", "17001"], {"advertise_steal_port": 17001}),
    (["--advertise-result-port", "17002"], {"advertise_result_port": 17002}),
    (["--curve-key-file", "node.key_secret", "--curve-allow-dir", "peers"],
     {"curve_key_file": "node.key_secret", "curve_allow_dir": "peers"}),
    (["--node-name", "n1"], {"node_name": "n1"}),
    (["--max-queue-len", "10"], {"max_queue_len": 10}),
    (["--max-tokens-cap", "512"], {"max_tokens_cap": 512}),
    (["--engine", "sim"], {"engine": "sim"}),
    (["--model", "small"], {"model": "small"}),
    (["--device", "cuda:1"], {"device": "cuda:1"}),
    (["--dtype", "bfloat16"], {"dtype": "bfloat16"}),
    (["--attention-backend", "torch"], {"attention_backend": "torch"}),
    (["--cuda-graphs", "off"], {"cuda_graphs": "off"}),
    (["--cuda-graphs"], {"cuda_graphs": "on"}),
    (["--use-cudagraph"], {"cuda_graphs": "on"}),
    (["--use-cudagraph", "--no-cuda-graphs"], {"cuda_graphs": "off"}),
    (["--cpu-threads", "1"], {"cpu_threads": 1}),
    (["--min-step-ms", "5"], {"min_step_ms": 5.0}),
    (["--max-num-seqs", "64"], {"engine_config.max_num_seqs": 64}),
    (["--max-num-batched-tokens", "512"], {"engine_config.max_num_batched_tokens": 512}),
    (["--block-size", "32"], {"engine_config.block_size": 32}),
    (["--kv-cache-blocks", "100"], {"engine_config.kv_cache_blocks": 100}),
    (["--kv-cache-memory-gib", "1.5"], {"engine_config.kv_cache_memory_gib": 1.5}),
    (["--kv-cache-memory-fraction", "0.5"], {"engine_config.kv_cache_memory_fraction": 0.5}),
    (["--kv-cache-dtype", "fp8"], {"engine_config.kv_cache_dtype": "fp8"}),
    (["--max-model-len", "2048"], {"engine_config.max_model_len": 2048}),
    (["--no-enable-prefix-caching"], {"engine_config.enable_prefix_caching": False}),
    (["--no-enable-prefix-caching", "--enable-prefix-caching"], {}),
    (["--scheduler-name", "global"], {"scheduler.name": "global"}),
    (["--scheduler-host", "redis.internal"], {"scheduler.host": "redis.internal"}),
    (["--scheduler-port", "6380"], {"scheduler.port": 6380}),
    (["--scheduler-db", "2"], {"scheduler.db": 2}),
    (["--scheduler-username", "p2p"], {"scheduler.username": "p2p"}),
    (["--scheduler-password", "s3cret"], {"scheduler.password": "s3cret"}),
    (["--scheduler-password-file", "pw.txt"], {"scheduler.password_file": "pw.txt"}),
    (["--scheduler-tls", "--scheduler-tls-ca-file", "ca.pem", "--scheduler-tls-cert-file", "c.pem",
      "--scheduler-tls-key-file", "k.pem"],
     {"scheduler.tls": True, "scheduler.tls_ca_file": "ca.pem", "scheduler.tls_cert_file": "c.pem",
      "scheduler.tls_key_file": "k.pem"}),
    (["--scheduler-tls", "--no-scheduler-tls"], {}),
    (["--scheduler-sentinels", "s1:26379,[::1]:26380", "--scheduler-sentinel-master", "reg"],
     {"scheduler.sentinels": "s1:26379,[::1]:26380", "scheduler.sentinel_master": "reg"}),
    (["--scheduler-topic", "blue"], {"scheduler.topic": "blue"}),
    (["--scheduler-ttl", "12.5"], {"scheduler.ttl": 12.5}),
    (["--scheduler-min-load-score", "2.5"], {"scheduler.min_load_score": 2.5}),
    (["--scheduler-load-shards-num", "4"], {"scheduler.load_shards_num": 4}),
    (["--heartbeat-interval", "0.2"], {"scheduler.heartbeat_interval": 0.2}),
    (["--lease-timeout", "1.5"], {"scheduler.lease_timeout": 1.5}),
    (["--steal-timeout", "0.1"], {"scheduler.steal_timeout": 0.1}),
    (["--recheck-interval", "0.05"], {"scheduler.recheck_interval": 0.05}),
    (["--sim-vocab-size", "1000"], {"sim.vocab_size": 1000}),
    (["--sim-max-model-len", "8192", "--sim-kv-tokens", "8192"],
     {"sim.max_model_len": 8192, "sim.kv_tokens": 8192}),
    (["--sim-prefill-ms-per-token", "0"], {"sim.prefill_ms_per_token": 0.0}),
    (["--sim-decode-step-ms", "10"], {"sim.decode_step_ms": 10.0}),
    (["--sim-decode-ms-per-seq", "0.5"], {"sim.decode_ms_per_seq": 0.5}),
    (["--sim-decode-ms-per-kilotoken", "0"], {"sim.decode_ms_per_kilotoken": 0.0}),
    (["--sim-stall-s", "30"], {"sim.stall_s": 30.0}),
]


def settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf setting of a config tree, by dotted path."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(settings(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def generated_flags() -> set[str]:
    return {name for leaf in config_fields(NodeConfig) for name in leaf.names} | {"--log-level"}


def documented_flags() -> dict[str, str]:
    """Flag -> the default column of its row, from the tables of docs/configuration.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| `--"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`(--[a-z0-9-]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


@pytest.mark.parametrize("changes, message", [
    ({"port": 0}, "scheduler port"),
    ({"topic": "a{b}"}, "topic"),
    ({"ttl": 0}, "ttl"),
    ({"min_load_score": 0}, "min load score"),
    ({"min_load_score": 0.5}, "min load score"),
    ({"load_shards_num": 0}, "load shards"),
    ({"lease_timeout": -1}, "lease timeout"),
])
def test_bad_scheduler_values_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(SchedulerConfig(), **changes)


# FastDeploy's load-balancing guide, flag for flag, but for the module (the model is a directory in tests)
SEED_LAUNCH_LINE = (
    '--port 8801 --metrics-port 8802 --engine-worker-queue-port 8803 --model baidu/ERNIE-4.5-0.3B-Paddle '
    '--scheduler-name global --scheduler-ttl 900 --scheduler-host "127.0.0.1" --scheduler-port 6379 '
    '--scheduler-db 0 --scheduler-password "" --scheduler-topic "default" --scheduler-min-load-score 3 '
    '--scheduler-load-shards-num 1')


def test_fastdeploy_flags_map_onto_the_config():
    args = build_parser().parse_args([*shlex.split(SEED_LAUNCH_LINE), "--use-cudagraph"])
    cfg = config_from_args(args)
    assert cfg.port == 8801 and cfg.metrics_port == 8802 and cfg.engine_worker_queue_port == "8803"
    assert cfg.model == "baidu/ERNIE-4.5-0.3B-Paddle"
    assert cfg.scheduler.is_global and cfg.scheduler.ttl == 900.0
    assert cfg.scheduler == SchedulerConfig(name="global", ttl=900.0, min_load_score=3.0)
    assert cfg.cuda_graphs == "on"
    assert isinstance(cfg, NodeConfig)


def test_every_setting_has_a_flag_or_says_why_not():
    leaves = list(config_fields(NodeConfig))
    assert [leaf.dest for leaf in leaves] == list(settings(NodeConfig()))
    internal = {leaf.dest: leaf.meta["internal"] for leaf in leaves if leaf.is_internal}
    assert ["engine_config.decode_graphs"] == list(internal)
    assert "--cuda-graphs" in internal["engine_config.decode_graphs"]


def test_a_setting_without_a_flag_or_a_reason_stops_the_parser_being_built():
    @dataclasses.dataclass(frozen=True)
    class Forgotten:
        shown: int = dataclasses.field(default=1, metadata=flag("--shown", "has one"))
        forgotten: int = 2

    with pytest.raises(TypeError, match="Forgotten.forgotten"):
        list(config_fields(Forgotten))


def test_the_round_trips_use_every_flag():
    used = {word for argv, _ in ROUND_TRIPS for word in argv if word.startswith("--")}
    assert generated_flags() - {"--log-level"} == used


@pytest.mark.parametrize("argv, changes", ROUND_TRIPS, ids=[" ".join(argv) for argv, _ in ROUND_TRIPS])
def test_each_flag_sets_its_setting_and_nothing_else(argv, changes):
    expected = settings(NodeConfig()) | changes
    assert expected == settings(config_from_args(build_parser().parse_args(argv)))


def test_every_old_flag_is_still_accepted():
    assert OLD_FLAGS <= generated_flags()
    options = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert generated_flags() | {"-h", "--help"} == options


def test_flag_defaults_are_the_config_defaults():
    assert NodeConfig() == config_from_args(build_parser().parse_args([]))
    assert NodeConfig().engine_config == EngineConfig()
    assert "auto" == NodeConfig().cuda_graphs


@pytest.mark.parametrize("flags, word", [
    (["--scheduler-port", "70000"], "scheduler port"),
    (["--max-num-seqs", "0"], "max num seqs"),  # EngineConfig's own check, translated at the boundary
    (["--kv-cache-memory-fraction", "1.5"], "fraction"),
    (["--kv-cache-memory-gib", "-1"], "GiB"),
    (["--block-size", "12"], "block size"),
    (["--kv-cache-dtype", "int8"], "--kv-cache-dtype"),
    (["--max-model-len", "9999999"], "max model len"),
    (["--sim-kv-tokens", "100"], "sim kv tokens"),
    (["--scheduler-load-shards-num", "x"], "--scheduler-load-shards-num"),
    (["--engine", "gpt"], "--engine"),
    (["--cuda-graphs", "maybe"], "--cuda-graphs"),
    (["--port", "nope"], "--port"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_cli_values_exit_2_with_one_line(flags, word, capsys):
    try:
        code = main(flags)
    except SystemExit as exc:  # argparse's own errors (type, choices, unknown flags)
        code = exc.code
    err = capsys.readouterr().err
    assert 2 == code
    assert 1 == err.count("\n") and err.startswith("python -m p2psched.server: error: ") and word in err


def test_cuda_graphs_on_a_cpu_exit_2_with_one_line():
    """Checked in the engine process, where the device is known."""
    proc = subprocess.run([sys.executable, "-m", "p2psched.server", "--cuda-graphs", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert 2 == proc.returncode
    assert "--cuda-graphs on needs a CUDA device" in proc.stderr.strip().splitlines()[-1]


def test_docs_list_every_flag_and_only_real_ones():
    documented = documented_flags()
    assert generated_flags() - set(documented) == set(), "flags missing from docs/configuration.md"
    assert set(documented) - generated_flags() == set(), "docs/configuration.md lists flags that do not exist"


def test_docs_give_each_flags_default():
    """The default column starts with the default, where the default is a value to show."""
    documented = documented_flags()
    for leaf in config_fields(NodeConfig):
        if leaf.is_internal or leaf.default in ("", None):
            continue
        shown = documented[leaf.meta["flag"]].split()[0].strip("`")
        if isinstance(leaf.default, bool):
            assert ("on" if leaf.default else "off") == shown, leaf.dest
        elif isinstance(leaf.default, (int, float)):
            assert leaf.default == float(shown), leaf.dest
        else:
            assert leaf.default == shown, leaf.dest


@pytest.mark.parametrize("mode, backend, expected", [
    ("auto", "triton", True),  # the Triton backend runs only on CUDA
    ("auto", "torch", False),  # CPU, or a head dim the kernels do not serve
    ("on", "triton", True),
    ("off", "triton", False),
])
def test_cuda_graphs_auto_follows_the_backend(mode, backend, expected):
    from p2psched.engine_factory import decode_graphs_for

    assert expected == decode_graphs_for(mode, backend)


def test_the_engine_gets_the_nested_engine_config_on_cpu():
    """``--cuda-graphs auto`` on a CPU builds (graphs on the torch backend would refuse), and the
    KV budget in GiB sizes the cache: tiny has 8 KiB float32 blocks of 16 tokens, so 1 MiB is 128."""
    from p2psched.engine_factory import build_engine

    config = NodeConfig(device="cpu", model="tiny",
                        engine_config=EngineConfig(max_num_seqs=3, kv_cache_memory_gib=1 / 1024))
    _engine, ready = build_engine(config)
    assert 128 == ready.stats.kv_blocks_total
    assert 3 == ready.limits.max_num_seqs
    with pytest.raises(ConfigError, match="--cuda-graphs on needs a CUDA device"):
        build_engine(dataclasses.replace(config, cuda_graphs="on"))


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
    from p2psched.engine_factory import attention_backend_for

    if expected is ConfigError:
        with pytest.raises(ConfigError, match=f"this model's is {head_dim}"):
            attention_backend_for(requested, device, head_dim, graphs)
    else:
        assert attention_backend_for(requested, device, head_dim, graphs) == expected
