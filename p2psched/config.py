"""Frozen, validated configuration. Built once from the CLI (see ``server.py``); never mutated.

Variants are made with ``dataclasses.replace``, which re-runs validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import ConfigError
from .protocol import MAX_CONTEXT_TOKENS


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_port(name: str, port: int, allow_zero: bool = True) -> None:
    low = 0 if allow_zero else 1
    _check(low <= port <= 65535, f"{name} must be in {low}..65535, got {port}")


@dataclass(frozen=True)
class SchedulerConfig:
    """The ``--scheduler-*`` flags, with FastDeploy's names and meanings, plus our timings."""

    name: Literal["local", "global"] = "local"  # "global" = join the cluster and steal
    host: str = "127.0.0.1"  # Redis host
    port: int = 6379  # Redis port
    db: int = 0
    username: str = ""  # Redis ACL user ("" = the default user)
    password: str = ""
    password_file: str = ""  # read the password from this file (first line) instead of the command line
    tls: bool = False  # rediss://: TLS to Redis
    tls_ca_file: str = ""  # CA bundle that signed Redis's certificate ("" = the system's)
    tls_cert_file: str = ""  # client certificate, for Redis configured with tls-auth-clients
    tls_key_file: str = ""
    topic: str = "default"  # namespace: only nodes with the same topic steal from each other
    ttl: float = 900.0  # longest a request may wait before it first starts on some engine
    min_load_score: int = 3  # a peer is a victim only with at least this many pending requests
    load_shards_num: int = 1  # load index split into this many sorted sets
    heartbeat_interval: float = 1.0  # registry refresh; the node record expires after 3 of these
    lease_timeout: float = 3.0  # a stolen request silent this long is taken back by its origin
    steal_timeout: float = 0.25  # a steal RPC unanswered this long moves on to the next peer
    recheck_interval: float = 0.5  # idle nodes re-check for work at least this often

    def __post_init__(self) -> None:
        _check(self.name in ("local", "global"), f"scheduler name must be local or global, got {self.name!r}")
        _check(bool(self.host), "scheduler host must not be empty")
        _check_port("scheduler port", self.port, allow_zero=False)
        _check(0 <= self.db <= 65535, f"scheduler db must be >= 0, got {self.db}")
        _check(not (self.password and self.password_file), "give the Redis password or a password file, not both")
        _check(bool(self.tls_cert_file) == bool(self.tls_key_file),
               "a Redis TLS client certificate needs its key (and the other way round)")
        _check(self.tls or not (self.tls_ca_file or self.tls_cert_file), "Redis TLS files need --scheduler-tls")
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

    vocab_size: int = 32000
    max_model_len: int = 4096
    prefill_ms_per_token: float = 0.02
    decode_step_ms: float = 2.0  # a decode step with one short sequence
    decode_ms_per_seq: float = 0.2  # extra per sequence in the batch
    decode_ms_per_kilotoken: float = 0.05  # extra per 1000 tokens of context in the batch
    kv_tokens: int = 65536  # KV capacity in tokens: prompt + max_tokens are reserved per request
    stall_s: float = 0.0  # fault injection: on SIGUSR1 the next step hangs this long (0: SIGUSR1 not handled)

    def __post_init__(self) -> None:
        _check(2 <= self.vocab_size <= 1 << 24, "sim vocab size must be in 2..16M")
        _check(2 <= self.max_model_len <= MAX_CONTEXT_TOKENS, f"sim max model len must be in 2..{MAX_CONTEXT_TOKENS}")
        for name in ("prefill_ms_per_token", "decode_step_ms", "decode_ms_per_seq", "decode_ms_per_kilotoken",
                     "stall_s"):
            _check(getattr(self, name) >= 0, f"sim {name.replace('_', ' ')} must be >= 0")
        _check(self.kv_tokens >= self.max_model_len, "sim kv tokens must hold at least one full-length request")


@dataclass(frozen=True)
class NodeConfig:
    """One node: HTTP surface, ZeroMQ endpoints, engine limits and the scheduler."""

    host: str = "127.0.0.1"  # bind address for HTTP and ZeroMQ
    advertise_host: str = ""  # address peers use to reach us; defaults to host
    port: int = 8000  # HTTP
    metrics_port: int | None = None  # Prometheus /metrics on its own port (also on the HTTP port)
    max_concurrent_requests: int = 0  # in-flight HTTP requests before 429; 0 = no limit
    steal_port: int = 0  # 0 = an ephemeral port
    result_port: int = 0
    # Ports peers dial, when they differ from the bound ones (NAT, port mapping, a proxy); 0 = bound port.
    advertise_steal_port: int = 0
    advertise_result_port: int = 0
    curve_key_file: str = ""  # CurveZMQ secret key file (python -m p2psched.keys); "" = no encryption/auth
    curve_allow_dir: str = ""  # directory of peer public key files allowed to connect (needs curve_key_file)
    node_name: str = ""
    engine: Literal["real", "sim"] = "real"
    model: str = ""  # preset name or Hugging Face directory; "" = "tiny" (real) or "sim"
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # cuda when available, else cpu
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 2048
    kv_cache_blocks: int = 0  # 0: sized from memory
    kv_cache_memory_fraction: float = 0.8  # of free GPU memory, when kv_cache_blocks is 0 on CUDA
    block_size: int = 16
    max_model_len: int = 0  # 0: the model's own limit (capped at 8192)
    cpu_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    attention_backend: str = "auto"  # triton on CUDA, torch elsewhere
    cuda_graphs: bool = False  # replay decode steps from CUDA graphs (CUDA + triton backend)
    min_step_ms: float = 0.0  # pace engine steps to at least this long (demos: several "accelerators" on one CPU)
    max_queue_len: int = 4096  # pending requests beyond this get 503 + Retry-After
    max_tokens_cap: int = 4096
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sim: SimEngineConfig = field(default_factory=SimEngineConfig)

    def __post_init__(self) -> None:
        _check(bool(self.host), "host must not be empty")
        _check_port("port", self.port)
        if self.metrics_port is not None:
            _check_port("metrics port", self.metrics_port)
        _check(self.max_concurrent_requests >= 0, "max concurrent requests must be >= 0 (0 = no limit)")
        _check_port("steal port", self.steal_port)
        _check_port("result port", self.result_port)
        _check_port("advertised steal port", self.advertise_steal_port)
        _check_port("advertised result port", self.advertise_result_port)
        _check(bool(self.curve_key_file) == bool(self.curve_allow_dir),
               "CurveZMQ needs both a key file and an allow-list directory")
        _check(self.engine in ("real", "sim"), f"engine must be 'real' or 'sim', got {self.engine!r}")
        _check(1 <= self.max_num_seqs <= 4096, f"max num seqs must be in 1..4096, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= 1, "max num batched tokens must be >= 1")
        _check(self.kv_cache_blocks >= 0, "kv cache blocks must be >= 0 (0 = size from memory)")
        _check(0 < self.kv_cache_memory_fraction <= 0.95, "kv cache memory fraction must be in (0, 0.95]")
        _check(self.block_size in (8, 16, 32, 64, 128), "block size must be 8, 16, 32, 64 or 128")
        _check(0 <= self.max_model_len <= MAX_CONTEXT_TOKENS,
               f"max model len must be in 0..{MAX_CONTEXT_TOKENS} (0 = the model's own)")
        _check(self.cpu_threads >= 0, "cpu threads must be >= 0 (0 = torch's default)")
        _check(self.attention_backend in ("auto", "triton", "torch"),
               f"attention backend must be auto, triton or torch, got {self.attention_backend!r}")
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
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
