"""Rotary position embedding of q and k in place, both in one launch.

Two layouts of the pairs within a head (``server/rope.py``): Hugging Face's "rotate half", where
dims i and i + half are pair i, and with ``interleaved`` (ERNIE 4.5) dims 2i and 2i+1. cos/sin
tables: [max_positions, half], float32, row i the angle of pair i in either layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# positions: a view into the step's one upload, at an offset that changes with the batch (and loaded as a scalar)
@triton.jit(do_not_specialize_on_alignment=["positions"])
def _rotary_kernel(Q, K, positions, Cos, Sin, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
                   num_q_heads, num_k_heads, HALF: tl.constexpr, HEADS: tl.constexpr, INTERLEAVED: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + token).to(tl.int64)
    half = tl.arange(0, HALF)
    cos = tl.load(Cos + pos * stride_cos + half)[None, :]  # [1, HALF]
    sin = tl.load(Sin + pos * stride_cos + half)[None, :]
    heads = tl.arange(0, HEADS)[:, None]  # [HEADS, 1]
    first = half * 2 if INTERLEAVED else half  # [HALF] offsets of each pair's first dim within a head
    second = 1 if INTERLEAVED else HALF  # and of its second, from the first
    for which in tl.static_range(2):
        base = Q + token * stride_qt if which == 0 else K + token * stride_kt
        stride_h = stride_qh if which == 0 else stride_kh
        count = num_q_heads if which == 0 else num_k_heads
        ok = heads < count
        lo_ptr = base + heads * stride_h + first[None, :]
        x1 = tl.load(lo_ptr, mask=ok, other=0.0)
        x2 = tl.load(lo_ptr + second, mask=ok, other=0.0)
        y1 = x1.to(tl.float32) * cos - x2.to(tl.float32) * sin
        y2 = x2.to(tl.float32) * cos + x1.to(tl.float32) * sin
        tl.store(lo_ptr, y1.to(x1.dtype), mask=ok)
        tl.store(lo_ptr + second, y2.to(x1.dtype), mask=ok)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, interleaved: bool = False) -> None:
    """q [tokens, heads, dim], k [tokens, kv_heads, dim] rotated in place at ``positions`` [tokens];
    ``interleaved``: pairs are dims (2i, 2i+1), else (i, i + dim/2)."""
    tokens, heads, dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != dim or positions.shape != (tokens,):
        raise ValueError("q, k and positions must cover the same tokens and head_dim")
    half = dim // 2
    if dim % 2 or half & (half - 1) or cos.shape[1] != half or sin.shape != cos.shape:
        raise ValueError(f"head_dim {dim} must be twice a power of two and match the tables ({tuple(cos.shape)})")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError("q and k need a contiguous last dimension, the tables must be contiguous")
    if tokens == 0:
        return
    _rotary_kernel[(tokens,)](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                              cos.stride(0), heads, k.shape[1], HALF=half,
                              HEADS=triton.next_power_of_2(max(heads, k.shape[1])), INTERLEAVED=interleaved)
