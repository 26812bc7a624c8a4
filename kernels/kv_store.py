"""Scatter new keys and values into their paged-cache slots.

Cache layout per layer: [2, num_blocks, block_size, kv_heads, head_dim]; slot = block * block_size + offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import FP8, quantize_kv


# slots: a view into the step's one upload, at an offset that changes with the batch (and loaded as a scalar)
@triton.jit(do_not_specialize_on_alignment=["slots"])
def _kv_store_kernel(K, V, Cache, slots, stride_kt, stride_kh, stride_vt, stride_vh, stride_c_kv, stride_c_slot,
                     stride_c_h, HEAD_DIM: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots + token).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + token * stride_kt + head * stride_kh + d)
    v = tl.load(V + token * stride_vt + head * stride_vh + d)
    dst = Cache + slot * stride_c_slot + head * stride_c_h + d
    tl.store(dst, k.to(Cache.dtype.element_ty))
    tl.store(dst + stride_c_kv, v.to(Cache.dtype.element_ty))


def kv_store(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: torch.Tensor | None = None) -> None:
    """k, v [tokens, kv_heads, head_dim]; cache [2, blocks, block_size, kv_heads, head_dim]; slots [tokens].
    An e4m3 cache needs ``kv_scales`` [2, kv_heads] (K's, V's): k and v are quantized by torch first
    (``quantize_kv``), then scattered as they are."""
    tokens, kv_heads, head_dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if cache.dim() != 5 or cache.shape[0] != 2 or tuple(cache.shape[3:]) != (kv_heads, head_dim):
        raise ValueError(f"cache {tuple(cache.shape)} does not hold [2, blocks, block, {kv_heads}, {head_dim}]")
    if not cache.is_contiguous():
        raise ValueError("the KV cache must be contiguous")
    if slot_mapping.shape != (tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError("slot_mapping must be an int tensor of one slot per token")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last dimension")
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} must be a power of two")
    if tokens == 0:
        return
    if cache.dtype == FP8:
        if kv_scales is None or kv_scales.shape != (2, kv_heads):
            raise ValueError(f"an FP8 KV cache needs kv_scales of shape (2, {kv_heads})")
        k, v = quantize_kv(k, kv_scales[0]), quantize_kv(v, kv_scales[1])
    flat = cache.view(2, -1, kv_heads, head_dim)  # [2, slots, kv_heads, head_dim]
    _kv_store_kernel[(tokens, kv_heads)](k, v, flat, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                                         v.stride(1), flat.stride(0), flat.stride(1), flat.stride(2),
                                         HEAD_DIM=head_dim)
