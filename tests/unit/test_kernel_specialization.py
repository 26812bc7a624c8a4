"""Serving never compiles a kernel: what may make Triton compile a new variant is pinned here.

Triton compiles one variant of a kernel per specialization key: the constexprs, and for every
other argument its type, whether an int is 1 or a multiple of 16, and whether a pointer is
16-byte aligned. An argument that changes from step to step (a block-table width, a scratch
stride, an offset into the step's one upload) must be excluded with ``do_not_specialize`` or
``do_not_specialize_on_alignment``, or every new value class compiles a variant while a request
waits (on an H200, 40-60% of a loaded node's samples were Triton compiling). ``ALLOWED`` lists,
per kernel, the arguments that may specialize: each fixed for an engine's lifetime (model shape,
cache layout, fresh allocations). A new argument fails ``test_...allow_list`` until it is either
excluded or added here with that reason; ``test_serving_...`` checks the claim on the real
engine: no launch key after warm-up that warm-up did not already produce.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections import defaultdict
from typing import Any

import pytest

triton = pytest.importorskip("triton")
native = pytest.importorskip("triton._C.libtriton")

import kernels  # noqa: E402
from server.attention import TritonAttention  # noqa: E402
from server.engine import EngineConfig, LLMEngine  # noqa: E402
from server.loader import load  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402

# Floats (scale, eps) are listed for completeness: Triton never specializes them.
ALLOWED = {
    "_attention_kernel": {"Q", "Cache", "Out", "PartOut", "PartM", "PartL", "scale", "kv_heads",
                          "stride_qt", "stride_qh", "stride_ot", "stride_oh",  # model shape (explicit strides)
                          "stride_ckv", "stride_cb", "stride_cs", "stride_ch",  # cache layout
                          "stride_pt", "stride_ph", "stride_mt"},  # heads x head_dim
    "_combine_kernel": {"Out", "PartOut", "PartM", "PartL", "stride_ot", "stride_oh", "stride_pt", "stride_ph",
                        "stride_mt"},
    "_kv_store_kernel": {"K", "V", "Cache", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_c_kv",
                         "stride_c_slot", "stride_c_h"},
    "_rms_norm_kernel": {"X", "R", "W", "Out", "stride_x", "stride_r", "stride_o", "n_cols", "eps"},
    "_rotary_kernel": {"Q", "K", "Cos", "Sin", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_cos",
                       "num_q_heads", "num_k_heads"},
    "_silu_and_mul_kernel": {"X", "Out", "stride_x", "stride_o", "n_cols"},
}
# inlined into a kernel: never launched, never specialized on its own
DEVICE_FUNCTIONS = {"_attend_span", "_part_length"}


def jit_functions() -> dict[str, Any]:
    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.KernelInterface) and hasattr(obj, "fn"):
                found[name] = obj
    return found


def excluded(kernel: Any) -> tuple[set[str], set[str]]:
    """(do_not_specialize, do_not_specialize_on_alignment) of a JITFunction or an interpreted one."""
    options = getattr(kernel, "kwargs", None) or {}
    dns = getattr(kernel, "do_not_specialize", None) or options.get("do_not_specialize") or []
    dnsa = getattr(kernel, "do_not_specialize_on_alignment", None) or options.get("do_not_specialize_on_alignment") or []
    names = list(inspect.signature(kernel.fn).parameters)
    as_names = lambda items: {names[i] if isinstance(i, int) else i for i in items}  # noqa: E731
    return as_names(dns), as_names(dnsa)


def is_constexpr(kernel: Any, name: str) -> bool:
    return "constexpr" in str(kernel.fn.__annotations__.get(name, ""))


def specializable(kernel: Any) -> set[str]:
    dns, dnsa = excluded(kernel)
    return {name for name in inspect.signature(kernel.fn).parameters
            if not is_constexpr(kernel, name) and name not in dns | dnsa}


def test_every_kernel_specializes_only_on_its_allow_list():
    functions = jit_functions()
    assert set(functions) == set(ALLOWED) | DEVICE_FUNCTIONS, "a new @triton.jit function: add it to ALLOWED"
    for name, allowed in ALLOWED.items():
        assert specializable(functions[name]) == allowed, name


def launch_key(kernel: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What Triton's launcher keys its compiled variants on, computed the way it does."""
    backend = triton.backends.compiler.BaseBackend
    params = inspect.signature(kernel.fn).parameters
    bound = {**{name: p.default for name, p in params.items()}, **dict(zip(params, args)),
             **{k: v for k, v in kwargs.items() if k in params}}
    dns, dnsa = excluded(kernel)
    key: list[Any] = []
    for name in params:
        value = bound[name]
        if is_constexpr(kernel, name):
            key.append((name, value))
        else:
            if name in dnsa:
                assert hasattr(value, "data_ptr"), f"{name}: do_not_specialize_on_alignment is for pointers"
            key.append((name, native.native_specialize_impl(backend, value, False, name not in dns,
                                                            name not in dnsa)))
    return tuple(key) + tuple(sorted((k, str(v)) for k, v in kwargs.items() if k not in params))


def record_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[tuple[Any, ...]]]:
    keys: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
    for name, kernel in jit_functions().items():
        if name in DEVICE_FUNCTIONS:
            continue

        def run(*args: Any, grid: Any, warmup: bool, _kernel: Any = kernel, _name: str = name,
                _run: Any = kernel.run, **kwargs: Any) -> Any:
            keys[_name].add(launch_key(_kernel, args, kwargs))
            return _run(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return keys


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_serving_launches_no_variant_that_warm_up_did_not(kv_cache_dtype):
    """The tiny model through the Triton kernels (the interpreter on CPU): warm-up, then a workload
    that varies what varies while serving: batch sizes 1-4, prompts from one token to 16 blocks,
    chunked prefill beside decodes, prefix-cache hits, split and unsplit decode rows, block tables
    1 to 17 blocks wide (ints of 1 and of 16 are the values Triton would specialize on), greedy
    and seeded rows; over a cache in the model's dtype and over an e4m3 one."""
    tiny = load("tiny", "float32", "cpu")
    backend = TritonAttention(min_partition=16)  # parts of 16 keys: tiny contexts split too
    engine = LLMEngine(tiny.model, tiny.config, tiny.tokenizer,
                       EngineConfig(kv_cache_blocks=64, block_size=8, max_num_seqs=4, max_num_batched_tokens=32,
                                    max_model_len=136, kv_cache_dtype=kv_cache_dtype), backend=backend)
    with pytest.MonkeyPatch.context() as patch:
        keys = record_launches(patch)
        engine.warm_up(context=136)
        warmed = {name: set(found) for name, found in keys.items()}
        assert "_combine_kernel" in warmed, "warm-up should split a decode row"

        def serve(prompts: list[list[int]], max_tokens: int) -> None:
            for prompt in prompts:
                i = engine.num_added
                engine.add(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=i,
                                                          temperature=0.8 * (i % 2), top_p=0.9))
            while engine.has_work():
                engine.step()

        serve([[7]], 2)  # alone: a one-block table
        serve([list(range(1, 129))], 2)  # chunks of 32 up to a 16-block table, then decodes of 17
        prompts = [[1, 2, 3], list(range(40, 48)), list(range(40, 49)), list(range(60, 90))]
        serve(prompts + prompts[2:], 6)  # batches of 1-4 rows; the repeats hit the prefix cache
        assert engine.graphs is not None and engine.graphs.replays > 0 and engine.blocks.prefix_hits > 0
    new = {name: found - warmed.get(name, set()) for name, found in keys.items()}
    assert {name: len(found) for name, found in new.items() if found} == {}
