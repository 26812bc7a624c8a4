"""Every ``@triton.jit`` kernel of ``kernels/`` compiles for an H100/H200 (sm_90), as serving launches it.

CI has no GPU: tests/unit/test_kernels.py runs the kernels in Triton's interpreter, which executes
them as Python and never meets the compiler, so a kernel the compiler refuses would pass CI and
fail on the first GPU launch. Triton compiles ahead of time on CPU, down to a cubin (its wheel
carries ptxas); this file does that for the variants serving launches.

Where the argument types come from: the real launchers are called on tensors built the way the
model and the engine build them (views of one qkv projection, int64 positions and slots from the
step's one upload, float32 rope tables, a KV cache sized as on an H200, on the meta device), with
each kernel's ``run`` replaced by a recorder. The recorded arguments are specialized by Triton's own
rule (``native_specialize_impl``, what a launch calls: pointer dtype and 16-byte alignment, i32 or
i64, ints of 1 and multiples of 16), so the signature, constexprs and divisibility hints are those
a launch compiles with; a renamed or added parameter follows the launcher, or fails to bind.

Why a child process: ``TRITON_INTERPRET=1`` (tests/conftest.py sets it without CUDA) is read when
``@triton.jit`` decorates, and Triton's own helpers (``tl.cdiv``, ``tl.max``...) were decorated
when triton was imported; interpreted, they make the compiler fail. ``triton.compile`` itself never
reads the flag, so a process that imports triton without it compiles as on a GPU machine.

Compiled (each case also checks the shared memory against an H100's 227 KiB per block, since a
config over it compiles but fails to load):
  - model shapes: llama-3-8b (bf16, head_dim 128, group 4, block 16, hidden 4096; i32 cache strides),
    qwen2.5-0.5b (fp16, head_dim 64, group 7, block 32, hidden 896; heads not a multiple of 16),
    tiny (fp32 as tests/gpu serves it, head_dim 16, group 2; a cache past 2**31 elements: i64 strides),
    llama-3-8b-fp8kv (llama-3-8b over an e4m3 cache, --kv-cache-dtype fp8);
  - per shape: kv_store, rotary, rms_norm (ADD=False), add_rms_norm (ADD=True), silu_and_mul, the
    merge of a split decode row (_combine_kernel), and the attention kernel's decode (BLOCK_Q 1,
    BLOCK_M 16) and prefill (BLOCK_M 128, plan's CUDA default) launches;
  - the attention kernel: every autotune candidate (DECODE_CONFIGS, PREFILL_CONFIGS) on llama-3-8b and
    llama-3-8b-fp8kv, whose head_dim 128 needs the most shared memory; the first candidate of each on
    the other shapes.
_attend_span and _part_length are device functions: compiled inside the kernels that call them.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton", reason="needs triton")

ROOT = Path(__file__).resolve().parents[2]
H100_MAX_SHARED_BYTES = 227 * 1024  # per block, opted in (H100 and H200 alike)
DEVICE_FUNCTIONS = {"_attend_span", "_part_length"}  # inlined into a kernel, never launched on its own
KV_CACHE_BYTES = int(0.8 * 130 * 2**30)  # the engine's default: 0.8 of an H200's free memory
CHILD_TIMEOUT_S = 600


def sm90_toolchain_missing() -> str | None:
    """Why this machine cannot compile for sm_90, or None."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as error:
        return f"triton has no NVIDIA backend ({error})"
    if "nvidia" not in backends:
        return "triton has no NVIDIA backend"
    try:
        _ = get_ptxas(90).path
    except RuntimeError as error:
        return f"no ptxas for triton's NVIDIA backend ({error})"
    return None


@dataclass(frozen=True)
class Shape:
    dtype: torch.dtype
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    kv_dtype: torch.dtype | None = None  # the KV cache's (None: the model's); float8_e4m3fn: --kv-cache-dtype fp8

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_dtype or self.dtype

    @property
    def num_blocks(self) -> int:
        """KV blocks an H200 holds for this model, as the engine sizes them from memory."""
        per_block = self.layers * 2 * self.block_size * self.kv_heads * self.head_dim * self.cache_dtype.itemsize
        return KV_CACHE_BYTES // per_block


SHAPES = {
    "llama-3-8b": Shape(torch.bfloat16, 4096, 14336, 32, 32, 8, 128, 16),
    "qwen2.5-0.5b": Shape(torch.float16, 896, 4864, 24, 14, 2, 64, 32),
    "tiny": Shape(torch.float32, 64, 128, 2, 4, 2, 16, 16),
    "llama-3-8b-fp8kv": Shape(torch.bfloat16, 4096, 14336, 32, 32, 8, 128, 16, torch.float8_e4m3fn),
}
# launch -> the kernel it runs; "decode" and "prefill" are the attention kernel's two launches
LAUNCHED_KERNEL = {"decode": "_attention_kernel", "prefill": "_attention_kernel", "combine": "_combine_kernel",
                   "kv_store": "_kv_store_kernel", "rotary": "_rotary_kernel", "rms_norm": "_rms_norm_kernel",
                   "add_rms_norm": "_rms_norm_kernel", "silu_and_mul": "_silu_and_mul_kernel"}


@dataclass(frozen=True)
class Case:
    shape: str
    launch: str
    config: tuple[int, int, int] | None = None  # the attention kernel's (BLOCK_N, num_warps, num_stages)

    @property
    def id(self) -> str:
        if self.config is None:
            return f"{self.shape}-{self.launch}"
        block_n, warps, stages = self.config
        return f"{self.shape}-{self.launch}-{block_n}x{warps}w{stages}s"


def cases() -> list[Case]:
    from kernels.paged_attention import DECODE_CONFIGS, PREFILL_CONFIGS

    found = []
    for shape in SHAPES:
        for kind, configs in (("decode", DECODE_CONFIGS), ("prefill", PREFILL_CONFIGS)):
            every = shape.startswith("llama-3-8b")
            found += [Case(shape, kind, config) for config in (configs if every else configs[:1])]
        found += [Case(shape, launch) for launch in LAUNCHED_KERNEL if launch not in ("decode", "prefill")]
    return found


# ---- the child: records the launches and compiles them (TRITON_INTERPRET unset) ----

@dataclass
class Launch:
    kernel: Any  # JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def record(kernel: Any, call: Callable[[], Any]) -> list[Launch]:
    """The launches ``call`` makes of ``kernel``, recorded instead of run."""
    launches: list[Launch] = []

    def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append(Launch(kernel, args, kwargs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel, "run", run)
        call()
    return launches


def serving_launches(s: Shape) -> dict[str, Launch]:
    """One step of a model of shape ``s`` through the launchers, called as Attention, MLP, RMSNorm and
    TritonAttention call them: two decode rows (one split into parts) beside a prefill chunk."""
    from kernels import activation, kv_store, paged_attention, rms_norm, rotary

    query_lens, context_lens = [1, 1, 40], [600, 300, 40]
    tokens = sum(query_lens)
    x = torch.empty(tokens, s.hidden, dtype=s.dtype)  # [tokens, hidden]
    residual, weight = torch.empty_like(x), torch.empty(s.hidden, dtype=s.dtype)
    gate_up = torch.empty(tokens, 2 * s.intermediate, dtype=s.dtype)  # gate_up_proj's output
    qkv = torch.empty(tokens, (s.heads + 2 * s.kv_heads) * s.head_dim, dtype=s.dtype)  # qkv_proj's output
    q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
    q = q.reshape(tokens, s.heads, s.head_dim)  # [tokens, heads, head_dim]
    k = k.reshape(tokens, s.kv_heads, s.head_dim)  # [tokens, kv_heads, head_dim]
    v = v.reshape(tokens, s.kv_heads, s.head_dim)
    packed = torch.zeros(3 * tokens + len(query_lens), dtype=torch.long)  # the engine's one upload
    _, positions, slots, _ = packed.split([tokens, tokens, tokens, len(query_lens)])
    cos = torch.empty(8192, s.head_dim // 2, dtype=torch.float32)  # RotaryEmbedding's tables
    sin = torch.empty_like(cos)
    # [2, blocks, block_size, kv_heads, head_dim]: no memory on the meta device, real strides
    cache = torch.empty(2, s.num_blocks + 1, s.block_size, s.kv_heads, s.head_dim, dtype=s.cache_dtype,
                        device="meta")
    kv_scales = torch.ones(2, s.kv_heads) if s.kv_dtype is not None else None
    tables = [list(range(-(-c // s.block_size))) for c in context_lens]
    # block_m: plan's default on CUDA; up to 4 parts of >= 256 keys, so the 600-key decode row is split and merged
    attn_plan = paged_attention.plan(query_lens, context_lens, tables, s.heads // s.kv_heads, torch.device("cpu"),
                                     splits=4, min_partition=256, block_m=128)
    launches = {
        "rms_norm": record(rms_norm._rms_norm_kernel, lambda: rms_norm.rms_norm(x, weight, 1e-5)),
        "add_rms_norm": record(rms_norm._rms_norm_kernel, lambda: rms_norm.add_rms_norm(x, residual, weight, 1e-5)),
        "silu_and_mul": record(activation._silu_and_mul_kernel, lambda: activation.silu_and_mul(gate_up)),
        "rotary": record(rotary._rotary_kernel, lambda: rotary.rotary_embedding(q, k, positions, cos, sin)),
        "kv_store": record(kv_store._kv_store_kernel, lambda: kv_store.kv_store(k, v, cache, slots, kv_scales)),
    }
    combine: list[Launch] = []
    attend = record(paged_attention._attention_kernel, lambda: combine.extend(record(
        paged_attention._combine_kernel,
        lambda: paged_attention.paged_attention(q, cache, attn_plan, s.head_dim ** -0.5, block_n=64,
                                                kv_scales=kv_scales))))
    launches.update(decode=attend[:1], prefill=attend[1:], combine=combine)
    assert {name: len(found) for name, found in launches.items()} == {name: 1 for name in launches}
    assert attend[0].kwargs["BLOCK_Q"] == 1 and attend[1].kwargs["BLOCK_M"] == 128
    return {name: found[0] for name, found in launches.items()}


def compile_for_sm90(launch: Launch, **overrides: Any) -> Any:
    """Compile ``launch`` as Triton's launcher would on an H100/H200, without a GPU."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fn = launch.kernel
    kwargs = {**launch.kwargs, **overrides}
    options = {key: kwargs.pop(key) for key in list(kwargs) if key not in fn.arg_names}  # num_warps, ...
    bound = inspect.signature(fn.fn).bind(*launch.args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            kind, key = "constexpr", value
        else:
            kind, key = native_specialize_impl(backend, value, param.is_const, not param.do_not_specialize,
                                               not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = key
        elif isinstance(key, str) and key:
            attrs[(index,)] = backend.parse_attr(key)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)


def kv_buffers(ttgir: str, block_n: int, head_dim: int) -> int:
    """How many K/V tiles the software pipeline keeps in shared memory: the leading dimension of the
    [buffers, BLOCK_N, head_dim] allocations in the TTGIR (0 where there are none)."""
    import re

    tile = rf"local_alloc[^\n]*-> !ttg\.memdesc<(\d+)x{block_n}x{head_dim}x"
    return max((int(n) for n in re.findall(tile, ttgir)), default=0)


def compile_cases(found: list[Case]) -> dict[str, Any]:
    """case id -> {"cubin", "shared", "error"}; "__kernels__": the @triton.jit functions of kernels/."""
    import importlib
    import pkgutil

    import kernels

    jit = [name for info in pkgutil.iter_modules(kernels.__path__)
           for name, obj in vars(importlib.import_module(f"kernels.{info.name}")).items()
           if isinstance(obj, triton.runtime.JITFunction)]
    results: dict[str, Any] = {"__kernels__": sorted(jit)}
    launches = {shape: serving_launches(SHAPES[shape]) for shape in {case.shape for case in found}}
    for case in found:
        overrides = {}
        if case.config is not None:
            overrides = dict(zip(("BLOCK_N", "num_warps", "num_stages"), case.config))
        try:
            compiled = compile_for_sm90(launches[case.shape][case.launch], **overrides)
            ptx = compiled.asm["ptx"]
            results[case.id] = {"cubin": "cubin" in compiled.asm, "shared": compiled.metadata.shared, "error": None,
                                "async_copies": ptx.count("cp.async.cg"), "wgmma": ptx.count("wgmma.mma_async"),
                                "kv_buffers": kv_buffers(compiled.asm["ttgir"], case.config[0],
                                                         SHAPES[case.shape].head_dim) if case.config else 0}
        except Exception:  # noqa: BLE001 (whatever the compiler raises is the report)
            results[case.id] = {"cubin": False, "shared": 0, "error": traceback.format_exc(limit=-3)}
    return results


# ---- the tests ----

@pytest.fixture(scope="module")
def compiled() -> dict[str, Any]:
    """Every case, compiled in one child process that imports triton without TRITON_INTERPRET."""
    missing = sm90_toolchain_missing()
    if missing is not None:
        pytest.skip(missing)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compiled.json"
        child = subprocess.run([sys.executable, "-m", "tests.unit.test_kernels_compile", str(out)], cwd=ROOT,
                               env=env, check=False, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        assert child.returncode == 0, child.stderr[-4000:]
        results: dict[str, Any] = json.loads(out.read_text())
    return results


def test_every_kernel_of_kernels_is_compiled_here(compiled: dict[str, Any]) -> None:
    assert sorted(set(LAUNCHED_KERNEL.values()) | DEVICE_FUNCTIONS) == compiled["__kernels__"]


@pytest.mark.parametrize("case", cases(), ids=lambda case: case.id)
def test_kernel_compiles_to_a_cubin_that_fits_an_h100(compiled: dict[str, Any], case: Case) -> None:
    """The attention cases carry an autotune candidate: BLOCK_N, num_warps, num_stages over the launch."""
    result = compiled[case.id]
    assert result["error"] is None, result["error"]
    assert result["cubin"]
    assert result["shared"] <= H100_MAX_SHARED_BYTES, f"{result['shared']} bytes of shared memory"


@pytest.mark.parametrize("case", [case for case in cases() if case.config is not None], ids=lambda case: case.id)
def test_attention_uses_hoppers_asynchronous_loads_and_warpgroup_mma(compiled: dict[str, Any], case: Case) -> None:
    """What issue 13 asks of the attention kernel on sm_90, read from the PTX and TTGIR.
    - K/V tiles are loaded asynchronously into shared memory ahead of their use (cp.async), into as
      many buffers as the software pipeline of ``num_stages`` needs (``num_stages - 1`` at least;
      with the block numbers loaded in the tile's own iteration, decode kept one at any depth).
    - The 16-bit prefill tile (BLOCK_M 128, a warpgroup's 64 rows or more) multiplies with Hopper's
      warpgroup MMA (wgmma). Decode tiles have 16 rows, under wgmma's 64: they stay on mma.sync,
      which is no loss where the memory is the limit; float32 (the tiny preset, exact IEEE
      products) has no tensor-core path."""
    result = compiled[case.id]
    assert result["error"] is None, result["error"]
    assert result["async_copies"] > 0, "K/V loads are not asynchronous"
    stages = case.config[2]
    assert result["kv_buffers"] >= max(1, stages - 1), f"{result['kv_buffers']} K/V buffers at {stages} stages"
    if case.launch == "prefill" and SHAPES[case.shape].dtype != torch.float32:
        assert result["wgmma"] > 0, "the prefill tile does not use warpgroup MMA"


if __name__ == "__main__":  # the child: python -m tests.unit.test_kernels_compile OUT.json
    Path(sys.argv[1]).write_text(json.dumps(compile_cases(cases())))
