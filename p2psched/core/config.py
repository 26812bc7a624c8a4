"""Frozen, validated configuration. Built once from the CLI (see ``server.py``); never mutated.

Each field names its command-line flag and help in its metadata (``flags.flag``), and
``flags.py`` generates the parser and builds the config back from it: a setting is written
once. The engine's own settings are ``server.engine_config.EngineConfig``, nested here as
``NodeConfig.engine_config`` and handed to the engine as is. Variants are made with
``dataclasses.replace``, which re-runs validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.engine_config import EngineConfig

from .errors import ConfigError
from .flags import flag, section
from .protocol import MAX_CONTEXT_TOKENS


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_port(name: str, port: int, allow_zero: bool = True) -> None:
    low = 0 if allow_zero else 1
    _check(low <= port <= 65535, f"{name} must be in {low}..65535, got {port}")


def _parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (``[addr]:port`` for IPv6) as (host, port) pairs, brackets dropped."""
    addresses: list[tuple[str, int]] = []
    for entry in (part.strip() for part in text.split(",")) if text.strip() else ():
        _check(bool(entry), f"scheduler sentinels {text!r} have an empty entry")
        host, colon, port = entry.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            _check(":" in host, f"scheduler sentinel {entry!r}: brackets are for IPv6 addresses")
        else:
            _check(":" not in host, f"scheduler sentinel {entry!r}: write an IPv6 address as [addr]:port")
        _check(bool(host and colon) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535,
               f"scheduler sentinel {entry!r} must be host:port with a port in 1..65535")
        _check((host, int(port)) not in addresses, f"scheduler sentinel {entry!r} is given twice")
        addresses.append((host, int(port)))
    return tuple(addresses)


@dataclass(frozen=True)
class SchedulerConfig:
    """The ``--scheduler-*`` flags, with FastDeploy's names and meanings, plus our timings."""

    name: Literal["local", "global"] = field(default="local", metadata=flag(
        "--scheduler-name", "global: register in Redis and steal work; local: serve alone"))
    host: str = field(default="127.0.0.1", metadata=flag("--scheduler-host", "Redis host"))
    port: int = field(default=6379, metadata=flag("--scheduler-port", "Redis port"))
    db: int = field(default=0, metadata=flag("--scheduler-db", "Redis database"))
    username: str = field(default="", metadata=flag(
        "--scheduler-username", "Redis ACL user (default: the default user)"))
    password: str = field(default="", metadata=flag("--scheduler-password", "Redis password (default: none)"))
    password_file: str = field(default="", metadata=flag(
        "--scheduler-password-file", "read the Redis password from this file (its first line) instead, keeping "
                                     "it out of ps"))
    tls: bool = field(default=False, metadata=flag("--scheduler-tls", "connect to Redis over TLS (rediss://)"))
    tls_ca_file: str = field(default="", metadata=flag(
        "--scheduler-tls-ca-file", "CA certificate(s) that signed Redis's certificate (default: the system's)"))
    tls_cert_file: str = field(default="", metadata=flag(
        "--scheduler-tls-cert-file", "client certificate, for a Redis with tls-auth-clients"))
    tls_key_file: str = field(default="", metadata=flag("--scheduler-tls-key-file", "the client certificate's key"))
    sentinels: str = field(default="", metadata=flag(
        "--scheduler-sentinels", "Redis Sentinel addresses, host:port,... ([addr]:port for IPv6): ask them where "
                                 "the registry's master is and follow its failovers; --scheduler-host and "
                                 "--scheduler-port are then not used (default: none, Redis at those)"))
    sentinel_master: str = field(default="mymaster", metadata=flag(
        "--scheduler-sentinel-master", "name of the master the sentinels monitor (with --scheduler-sentinels)"))
    topic: str = field(default="default", metadata=flag(
        "--scheduler-topic", "namespace: only nodes with the same topic steal from each other"))
    ttl: float = field(default=900.0, metadata=flag(
        "--scheduler-ttl", "seconds a request may wait before it first starts on some engine; then its client "
                           "gets an error"))
    min_load_score: float = field(default=1.0, metadata=flag(
        "--scheduler-min-load-score", "a peer is stolen from only with at least this many requests it could give "
                                      "(a float, as FastDeploy's: 2.5 means 3)"))
    load_shards_num: int = field(default=1, metadata=flag(
        "--scheduler-load-shards-num", "shards (sorted sets) of the Redis load index"))
    heartbeat_interval: float = field(default=1.0, metadata=flag(
        "--heartbeat-interval", "seconds between registry heartbeats; a node record expires after three"))
    lease_timeout: float = field(default=3.0, metadata=flag(
        "--lease-timeout", "seconds a thief may stay silent before the origin takes its request back"))
    steal_timeout: float = field(default=0.25, metadata=flag(
        "--steal-timeout", "seconds to wait for a grant before the peer counts as not answering"))
    recheck_interval: float = field(default=0.5, metadata=flag(
        "--recheck-interval", "seconds between a node's checks for work to steal, when nothing wakes it"))

    def __post_init__(self) -> None:
        _check(self.name in ("local", "global"), f"scheduler name must be local or global, got {self.name!r}")
        _check(bool(self.host), "scheduler host must not be empty")
        _check_port("scheduler port", self.port, allow_zero=False)
        _check(0 <= self.db <= 65535, f"scheduler db must be >= 0, got {self.db}")
        _check(not (self.password and self.password_file), "give the Redis password or a password file, not both")
        _check(bool(self.tls_cert_file) == bool(self.tls_key_file),
               "a Redis TLS client certificate needs its key (and the other way round)")
        _check(self.tls or not (self.tls_ca_file or self.tls_cert_file), "Redis TLS files need --scheduler-tls")
        _parse_sentinels(self.sentinels)
        _check(bool(self.sentinel_master) and len(self.sentinel_master) <= 128
               and self.sentinel_master.isprintable() and " " not in self.sentinel_master,
               f"scheduler sentinel master must be a name of 1..128 characters without spaces, "
               f"got {self.sentinel_master!r}")
        _check(bool(self.topic) and len(self.topic) <= 128, "scheduler topic must be 1..128 characters")
        _check(not any(c in self.topic for c in "{}: \t\n"), "scheduler topic must not contain '{', '}', ':' or whitespace")
        _check(self.ttl > 0, f"scheduler ttl must be > 0 seconds, got {self.ttl}")
        _check(self.min_load_score >= 1, f"scheduler min load score must be >= 1, got {self.min_load_score}")
        _check(1 <= self.load_shards_num <= 1024, f"scheduler load shards must be in 1..1024, got {self.load_shards_num}")
        for name in ("heartbeat_interval", "lease_timeout", "steal_timeout", "recheck_interval"):
            _check(getattr(self, name) > 0, f"{name.replace('_', ' ')} must be > 0 seconds")

    @property
    def is_global(self) -> bool:
        return self.name == "global"

    @property
    def sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        """``--scheduler-sentinels`` as (host, port) pairs (IPv6 without brackets); () without Sentinel."""
        return _parse_sentinels(self.sentinels)

    @property
    def registry_address(self) -> tuple[str, int]:
        """Where a node first reaches the registry: the first sentinel with Sentinel, else Redis."""
        sentinels = self.sentinel_addresses
        return sentinels[0] if sentinels else (self.host, self.port)

    @property
    def registry_record_ttl(self) -> float:
        """Seconds a node record lives in Redis without a heartbeat."""
        return 3 * self.heartbeat_interval

    @property
    def thief_heartbeat_interval(self) -> float:
        """A thief renews each lease three times per lease timeout."""
        return self.lease_timeout / 3


@dataclass(frozen=True)
class SimEngineConfig:
    """Cost model of the simulated engine (no model, tokens from a hash)."""

    vocab_size: int = field(default=32000, metadata=flag(
        "--sim-vocab-size", "token ids are drawn below this; nodes steal only from peers with the same one"))
    max_model_len: int = field(default=4096, metadata=flag("--sim-max-model-len", "longest prompt + output"))
    prefill_ms_per_token: float = field(default=0.02, metadata=flag(
        "--sim-prefill-ms-per-token", "extra step time per prompt token being prefilled"))
    decode_step_ms: float = field(default=2.0, metadata=flag(
        "--sim-decode-step-ms", "time of a decode step with one short sequence"))
    decode_ms_per_seq: float = field(default=0.2, metadata=flag(
        "--sim-decode-ms-per-seq", "extra step time per sequence in the batch"))
    decode_ms_per_kilotoken: float = field(default=0.05, metadata=flag(
        "--sim-decode-ms-per-kilotoken", "extra step time per 1000 tokens of context in the batch"))
    kv_tokens: int = field(default=65536, metadata=flag(
        "--sim-kv-tokens", "KV capacity in tokens; prompt + max_tokens are reserved per request"))
    stall_s: float = field(default=0.0, metadata=flag(
        "--sim-stall-s", "fault injection: on SIGUSR1 the next engine step hangs this many seconds, as a wedged "
                         "accelerator would (default 0: SIGUSR1 is not handled)"))

    def __post_init__(self) -> None:
        _check(2 <= self.vocab_size <= 1 << 24, "sim vocab size must be in 2..16M")
        _check(2 <= self.max_model_len <= MAX_CONTEXT_TOKENS, f"sim max model len must be in 2..{MAX_CONTEXT_TOKENS}")
        for name in ("prefill_ms_per_token", "decode_step_ms", "decode_ms_per_seq", "decode_ms_per_kilotoken",
                     "stall_s"):
            _check(getattr(self, name) >= 0, f"sim {name.replace('_', ' ')} must be >= 0")
        _check(self.kv_tokens >= self.max_model_len, "sim kv tokens must hold at least one full-length request")


@dataclass(frozen=True)
class NodeConfig:
    """One node: HTTP surface, ZeroMQ endpoints, the engine and the scheduler."""

    host: str = field(default="0.0.0.0", metadata=flag(
        "--host", "bind address for HTTP and ZeroMQ (default: every interface, as FastDeploy's)"))
    advertise_host: str = field(default="", metadata=flag(
        "--advertise-host", "address peers use to reach this node (default: --host; for 0.0.0.0 or ::, the "
                            "address of the interface that routes to Redis)"))
    port: int = field(default=8000, metadata=flag("--port", "HTTP port (also serves /metrics)"))
    metrics_port: int | None = field(default=None, metadata=flag(
        "--metrics-port", "a separate port serving Prometheus /metrics (default: none)"))
    engine_worker_queue_port: str = field(default="", metadata=flag(
        "--engine-worker-queue-port", "FastDeploy's port (or comma-separated ports) between its API server and "
                                      "engine workers: accepted so its launch line starts, logged as not "
                                      "applicable (the engine here talks to its node over local IPC)"))
    max_concurrent_requests: int = field(default=0, metadata=flag(
        "--max-concurrent-requests", "in-flight HTTP requests before new ones get 429 (default 0: no limit)"))
    steal_port: int = field(default=0, metadata=flag("--steal-port", "ZeroMQ steal port (default 0: any free)"))
    result_port: int = field(default=0, metadata=flag("--result-port", "ZeroMQ result port (default 0: any free)"))
    advertise_steal_port: int = field(default=0, metadata=flag(
        "--advertise-steal-port", "steal port peers dial, if it differs from the bound one (NAT, a proxy; "
                                  "default 0: the bound one)"))
    advertise_result_port: int = field(default=0, metadata=flag(
        "--advertise-result-port", "result port peers dial, if it differs from the bound one (default 0: the "
                                   "bound one)"))
    curve_key_file: str = field(default="", metadata=flag(
        "--curve-key-file", "CurveZMQ secret key file (python -m p2psched.keys writes one): encrypt and "
                            "authenticate every ZeroMQ connection; needs --curve-allow-dir"))
    curve_allow_dir: str = field(default="", metadata=flag(
        "--curve-allow-dir", "directory of public key files of the peers allowed to connect"))
    node_name: str = field(default="", metadata=flag("--node-name", "name shown in the registry and responses"))
    max_queue_len: int = field(default=4096, metadata=flag(
        "--max-queue-len", "pending requests before new ones get 503 with Retry-After"))
    max_tokens_cap: int = field(default=4096, metadata=flag(
        "--max-tokens-cap", "largest max_tokens a request may ask for (more gets 400); a chat request without "
                            "max_tokens gets the rest of the context, at most this"))
    engine: Literal["real", "sim"] = field(default="real", metadata=flag(
        "--engine", "real: the LLM engine; sim: a cost model for scale experiments", group="engine"))
    model: str = field(default="", metadata=flag(
        "--model", "a preset (tiny, small, llama-1b: random weights), a Hugging Face model directory, or a hub "
                   "id (owner/name) already in the local Hugging Face cache: nothing is downloaded (default: tiny; "
                   "sim with --engine sim)", group="engine"))
    device: str = field(default="auto", metadata=flag(
        "--device", "auto (CUDA when available), cpu, cuda or cuda:N", group="engine"))
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(default="auto", metadata=flag(
        "--dtype", "weights and KV cache (auto: float32 on CPU, bfloat16 on CUDA)", group="engine"))
    attention_backend: Literal["auto", "triton", "torch"] = field(default="auto", metadata=flag(
        "--attention-backend", "auto: Triton kernels on CUDA, the torch reference elsewhere", group="engine"))
    cuda_graphs: Literal["auto", "on", "off"] = field(default="auto", metadata=flag(
        "--cuda-graphs", "replay decode steps from CUDA graphs, one per batch-size bucket, captured at start; "
                         "auto: on with CUDA and the triton backend, off elsewhere; the bare flag (and "
                         "FastDeploy's --use-cudagraph) means on", aliases=("--use-cudagraph",), const="on",
        negation=("--no-cuda-graphs", "off"), group="engine"))
    cpu_threads: int = field(default=0, metadata=flag(
        "--cpu-threads", "torch threads on CPU (default 0: torch's choice; 1 when several nodes share a host)",
        group="engine"))
    min_step_ms: float = field(default=0.0, metadata=flag(
        "--min-step-ms", "pace engine steps to at least this many ms, so nodes sharing one CPU behave like "
                         "separate accelerators (demos; default 0: off)", group="engine"))
    engine_config: EngineConfig = field(default_factory=EngineConfig, metadata=section("engine"))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig,
                                       metadata=section("scheduler (FastDeploy-compatible names)"))
    sim: SimEngineConfig = field(default_factory=SimEngineConfig, metadata=section("simulated engine (--engine sim)"))

    def __post_init__(self) -> None:
        _check(bool(self.host), "host must not be empty")
        _check_port("port", self.port)
        if self.metrics_port is not None:
            _check_port("metrics port", self.metrics_port)
        for part in filter(None, self.engine_worker_queue_port.split(",")):
            _check(part.strip().isdigit(), f"engine worker queue port must be a port number (or a comma-separated "
                                           f"list of them), got {self.engine_worker_queue_port!r}")
            _check_port("engine worker queue port", int(part))
        _check(self.max_concurrent_requests >= 0, "max concurrent requests must be >= 0 (0 = no limit)")
        _check_port("steal port", self.steal_port)
        _check_port("result port", self.result_port)
        _check_port("advertised steal port", self.advertise_steal_port)
        _check_port("advertised result port", self.advertise_result_port)
        _check(bool(self.curve_key_file) == bool(self.curve_allow_dir),
               "CurveZMQ needs both a key file and an allow-list directory")
        _check(self.engine in ("real", "sim"), f"engine must be 'real' or 'sim', got {self.engine!r}")
        _check(self.engine_config.max_model_len <= MAX_CONTEXT_TOKENS,
               f"max model len must be in 0..{MAX_CONTEXT_TOKENS} (0 = the model's own)")
        _check(self.cpu_threads >= 0, "cpu threads must be >= 0 (0 = torch's default)")
        _check(self.attention_backend in ("auto", "triton", "torch"),
               f"attention backend must be auto, triton or torch, got {self.attention_backend!r}")
        _check(self.cuda_graphs in ("auto", "on", "off"),
               f"cuda graphs must be auto, on or off, got {self.cuda_graphs!r}")
        _check(0 <= self.min_step_ms <= 10_000, "min step ms must be in 0..10000")
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16"),
               f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        _check(self.max_queue_len >= 1, "max queue len must be >= 1")
        _check(1 <= self.max_tokens_cap <= MAX_CONTEXT_TOKENS, f"max tokens cap must be in 1..{MAX_CONTEXT_TOKENS}")
        _check(len(self.node_name) <= 128, "node name must be at most 128 characters")

    @property
    def model_name(self) -> str:
        """The model name clients send and /v1/models lists."""
        return self.model or ("sim" if self.engine == "sim" else "tiny")

    @property
    def binds_every_interface(self) -> bool:
        return self.host in ("0.0.0.0", "::")
