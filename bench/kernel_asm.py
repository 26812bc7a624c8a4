"""What the attention kernel compiles to on an H100/H200 (sm_90), per autotune candidate, on CPU.

    python -m bench.kernel_asm                          # this tree's kernels/
    python -m bench.kernel_asm --kernels-from .baseline # an older revision's (make gpu-baseline)

No GPU is needed: Triton compiles ahead of time (as tests/unit/test_kernels_compile.py does, whose
recorder and compiler this reuses). For each candidate (BLOCK_N, warps, stages) of the decode and
prefill launches of a Llama-3-8B-shaped step (bf16, head dim 128, GQA 4, 16-token blocks) it
prints the shared memory per program, how many K/V tiles the software pipeline keeps in flight
(the leading dimension of the [buffers, BLOCK_N, 128] shared allocations in the TTGIR), and
whether loads are asynchronous (cp.async, TMA) and products warpgroup MMAs (wgmma). It says how a
kernel is built, not how fast it runs: that is `make gpu-check`.
"""

from __future__ import annotations

import argparse
import os
import sys

H100_SHARED_KIB = 227


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_asm")
    parser.add_argument("--kernels-from", help="a folder holding another kernels/ (make gpu-baseline)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: the launches over an e4m3 cache (--kv-cache-dtype fp8)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("kernel_asm: unset TRITON_INTERPRET (the interpreter never compiles)", file=sys.stderr)
        return 2
    if args.kernels_from:
        sys.path.insert(0, os.path.abspath(args.kernels_from))
    import torch
    import triton

    from tests.unit.test_kernels_compile import SHAPES, compile_for_sm90, kv_buffers, record, sm90_toolchain_missing

    missing = sm90_toolchain_missing()
    if missing:
        print(f"kernel_asm: {missing}", file=sys.stderr)
        return 2
    import kernels.paged_attention as pa

    s = SHAPES["llama-3-8b"]
    query_lens, context_lens = [1, 1, 512], [600, 300, 512]
    tokens = sum(query_lens)
    q = torch.empty(tokens, s.heads, s.head_dim, dtype=s.dtype)
    fp8 = args.kv_cache_dtype == "fp8"
    cache = torch.empty(2, s.num_blocks + 1, s.block_size, s.kv_heads, s.head_dim,
                        dtype=torch.float8_e4m3fn if fp8 else s.dtype, device="meta")
    scales = {"kv_scales": torch.ones(2, s.kv_heads)} if fp8 else {}
    tables = [list(range(-(-c // s.block_size))) for c in context_lens]
    split = {"splits": 4} if hasattr(pa, "decode_splits") else {"partition": 256}  # the API before issue 13
    if fp8 and not hasattr(pa, "FP8"):
        print(f"kernel_asm: the kernels in {os.path.dirname(pa.__file__)} have no e4m3 cache", file=sys.stderr)
        return 2
    attn_plan = pa.plan(query_lens, context_lens, tables, s.heads // s.kv_heads, torch.device("cpu"), block_m=128,
                        **split)
    decode, prefill = record(pa._attention_kernel, lambda: record(  # the merge kernel: recorded, not run
        pa._combine_kernel, lambda: pa.paged_attention(q, cache, attn_plan, 0.1, block_n=64, **scales)))
    print(f"kernels: {os.path.dirname(pa.__file__)}; triton {triton.__version__}; sm_90; bf16, head dim 128, GQA 4, "
          f"{s.block_size}-token blocks; KV cache {cache.dtype}", flush=True)
    print("\n| launch | BLOCK_N, warps, stages | shared KiB | K/V buffers | cp.async | TMA | wgmma |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, launch, configs in (("decode", decode, pa.DECODE_CONFIGS), ("prefill", prefill, pa.PREFILL_CONFIGS)):
        for block_n, warps, stages in configs:
            compiled = compile_for_sm90(launch, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
            buffers = kv_buffers(ttgir, block_n, s.head_dim)
            shared = compiled.metadata.shared // 1024
            print(f"| {kind} | {block_n}, {warps}, {stages} | {shared}{' (over)' if shared > H100_SHARED_KIB else ''} "
                  f"| {buffers} | {ptx.count('cp.async.cg')} | {ptx.count('cp.async.bulk.tensor')} "
                  f"| {ptx.count('wgmma.mma_async')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
