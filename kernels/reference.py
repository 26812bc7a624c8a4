"""Torch references of the kernels: the CPU path and the test oracle. No Triton import here.

Paged attention over a flattened batch: for sequence ``i``, its ``query_lens[i]`` new tokens
sit at the end of a context of ``context_lens[i]`` tokens whose K/V live in the cache blocks
``block_tables[i]``; query ``j`` of the chunk sees keys ``0 .. context_len - query_len + j``.
Cache layout per layer: [2, num_blocks, block_size, kv_heads, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


FP8 = torch.float8_e4m3fn  # an FP8 KV cache: e4m3, one scale per (K or V, KV head) and layer
FP8_MAX = 448.0  # e4m3's largest finite value


def quantize_kv(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., kv_heads, head_dim] / scales [kv_heads] -> e4m3, rounded to nearest even, saturated
    at +-448 (torch's cast would make NaN of what lies beyond). The kernels call this too: Triton's
    interpreter rounds float-to-e4m3 wrongly where rounding carries into the exponent."""
    return (x.float() / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_cache(kv_cache: torch.Tensor, kv_scales: torch.Tensor) -> torch.Tensor:
    """A whole cache [2, blocks, block_size, kv_heads, head_dim] in e4m3, K and V with their scales [2, kv_heads]."""
    return torch.stack([quantize_kv(kv_cache[i], kv_scales[i]) for i in range(2)])


def dequantize_kv(kv: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """kv [..., kv_heads, head_dim] in e4m3 -> ``dtype``, times scales [kv_heads]."""
    return (kv.float() * scales[:, None]).to(dtype)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: torch.Tensor | None = None) -> None:
    """Scatter k, v [tokens, kv_heads, head_dim] into their slots (block * block_size + offset).
    An e4m3 cache needs ``kv_scales`` [2, kv_heads] (K's, V's)."""
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    if kv_cache.dtype == FP8:
        if kv_scales is None:
            raise ValueError("an FP8 KV cache needs kv_scales")
        k, v = quantize_kv(k, kv_scales[0]), quantize_kv(v, kv_scales[1])
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)  # index_copy_ has no e4m3
    flat[0].index_copy_(0, slot_mapping.long(), k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping.long(), v.to(flat.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: list[int], context_len: int,
              kv_scales: torch.Tensor | None = None, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's context: [context_len, kv_heads, head_dim] each; from an e4m3 cache,
    dequantized to ``dtype`` with ``kv_scales`` [2, kv_heads]."""
    block_size = kv_cache.shape[2]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = torch.tensor(block_table[:num_blocks], dtype=torch.long, device=kv_cache.device)
    k, v = kv_cache[0, blocks].flatten(0, 1)[:context_len], kv_cache[1, blocks].flatten(0, 1)[:context_len]
    if kv_cache.dtype == FP8:
        if kv_scales is None or dtype is None:
            raise ValueError("an FP8 KV cache needs kv_scales and the dtype to dequantize to")
        k, v = dequantize_kv(k, kv_scales[0], dtype), dequantize_kv(v, kv_scales[1], dtype)
    return k, v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q [q_len, heads, dim] against k, v [ctx, kv_heads, dim], causal to the end."""
    query_len, context_len = q.shape[0], k.shape[0]
    if query_len == context_len and query_len > 1:  # a whole prompt: plain causal, the fused kernel path
        o = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                           v.transpose(0, 1).float(), is_causal=True, scale=scale, enable_gqa=True)
        return o.transpose(0, 1).to(q.dtype)
    mask = None
    if query_len > 1:
        rows = torch.arange(query_len, device=q.device).unsqueeze(1) + (context_len - query_len)
        mask = torch.arange(context_len, device=q.device).unsqueeze(0) <= rows  # [q_len, ctx]
    o = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                       v.transpose(0, 1).float(), attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1).to(q.dtype)


def paged_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, query_lens: list[int],
                              context_lens: list[int], block_tables: list[list[int]], scale: float,
                              kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [tokens, heads, dim] -> [tokens, heads, dim], one sequence at a time, float32 inside
    (an e4m3 cache dequantized with ``kv_scales`` first)."""
    out = torch.empty_like(q)
    start = 0
    for query_len, context_len, table in zip(query_lens, context_lens, block_tables):
        k, v = gather_kv(kv_cache, table, context_len, kv_scales, torch.float32)
        out[start:start + query_len] = attend(q[start:start + query_len], k, v, scale)
        start += query_len
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated copies of q [tokens, heads, dim] and k [tokens, kv_heads, dim] ("rotate half")."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [tokens, 1, half]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of x + residual, x + residual): what ``add_rms_norm`` returns and leaves in residual."""
    total = x + residual
    return rms_norm_reference(total, weight, eps), total


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
