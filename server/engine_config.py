"""The engine's settings: one frozen dataclass, validated once, torch-free.

``LLMEngine`` reads it as is; a node nests it in its own config
(``p2psched.core.config.NodeConfig.engine_config``) and generates its command line from the field
metadata below. The metadata is plain data (``flag``, ``help``, ``aliases``; ``internal`` with
the reason a field has no flag; see ``p2psched/core/flags.py``), so this package still imports
nothing of the scheduler's (docs/decisions.md §12).

KV cache size, first match wins: ``kv_cache_blocks``; ``kv_cache_memory_gib`` (a fixed budget
on any device); on CUDA ``kv_cache_memory_fraction`` of the free memory; on CPU room for
``max_num_seqs`` full-length sequences, at most 2 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import EngineConfigError

BLOCK_SIZES = (8, 16, 32, 64, 128)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise EngineConfigError(message)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = field(default=8, metadata={
        "flag": "--max-num-seqs", "help": "sequences the engine runs at once"})
    max_num_batched_tokens: int = field(default=2048, metadata={
        "flag": "--max-num-batched-tokens", "help": "tokens per engine step, prefill chunks included"})
    block_size: int = field(default=16, metadata={
        "flag": "--block-size", "help": "tokens per KV block: 8, 16, 32, 64 or 128"})
    kv_cache_blocks: int = field(default=0, metadata={
        "flag": "--kv-cache-blocks", "help": "KV cache size in blocks (default 0: from memory)"})
    kv_cache_memory_gib: float = field(default=0.0, metadata={
        "flag": "--kv-cache-memory-gib",
        "help": "KV cache budget in GiB, on any device, when --kv-cache-blocks is 0 (default 0: on CUDA "
                "--kv-cache-memory-fraction of free memory; on CPU room for --max-num-seqs full-length "
                "sequences, at most 2 GiB)"})
    kv_cache_memory_fraction: float = field(default=0.8, metadata={
        "flag": "--kv-cache-memory-fraction",
        "help": "on CUDA, when --kv-cache-blocks and --kv-cache-memory-gib are 0: share of free GPU memory "
                "for the KV cache"})
    max_model_len: int = field(default=0, metadata={
        "flag": "--max-model-len", "help": "longest prompt + output (default 0: the model's own, capped at 8192)"})
    kv_cache_dtype: Literal["auto", "fp8"] = field(default="auto", metadata={
        "flag": "--kv-cache-dtype",
        "help": "auto: the model's dtype; fp8: e4m3 with a scale per layer, K or V and KV head, from a "
                "calibration pass at start (half the bytes of bf16; see docs/benchmarks.md for its accuracy)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "flag": "--enable-prefix-caching", "help": "share the KV blocks of common prompt prefixes"})
    decode_graphs: bool = field(default=False, metadata={
        "internal": "resolved from the node's --cuda-graphs auto|on|off by p2psched.engine_factory.build_engine, "
                    "where the device and attention backend are known"})

    def __post_init__(self) -> None:
        _check(1 <= self.max_num_seqs <= 4096, f"max num seqs must be in 1..4096, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= 1, "max num batched tokens must be >= 1")
        _check(self.block_size in BLOCK_SIZES, "block size must be 8, 16, 32, 64 or 128")
        _check(self.kv_cache_blocks >= 0, "kv cache blocks must be >= 0 (0 = size from memory)")
        _check(0 <= self.kv_cache_memory_gib <= 1 << 20, "kv cache memory GiB must be in 0..1048576 (0 = automatic)")
        _check(0 < self.kv_cache_memory_fraction <= 0.95, "kv cache memory fraction must be in (0, 0.95]")
        _check(self.max_model_len >= 0, "max model len must be >= 0 (0 = the model's own)")
        _check(self.kv_cache_dtype in ("auto", "fp8"), f"kv cache dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
