"""Attention over the paged KV cache: the backend interface and the torch reference backend.

A batch is flattened: the scheduled tokens of all sequences back to back. For sequence ``i``,
its ``query_lens[i]`` new tokens sit at the end of a context of ``context_lens[i]`` tokens whose
K/V live in the blocks listed in ``block_tables[i]``. A query at offset ``j`` of its chunk sees
keys ``0 .. context_len - query_len + j`` (the causal mask aligned to the end of the context),
which serves prefill chunks and decode tokens (``query_len == 1``) in one batch.

KV cache layout per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor  # [tokens] cache slot (block * block_size + offset) of each new token
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Store k/v at their slots, attend; q [tokens, heads, dim] -> [tokens, heads, dim]."""
        ...


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys and values into their cache slots (the reference twin of the store kernel)."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: list[int], context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's context: [context_len, kv_heads, head_dim] each."""
    block_size = kv_cache.shape[2]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = torch.tensor(block_table[:num_blocks], dtype=torch.long, device=kv_cache.device)
    k = kv_cache[0, blocks].flatten(0, 1)[:context_len]
    v = kv_cache[1, blocks].flatten(0, 1)[:context_len]
    return k, v


def reference_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Paged, variable-length, causal-to-the-end, grouped-query attention, one sequence at a time."""
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], kv_cache.shape[3]
    group = heads // kv_heads
    start = 0
    for query_len, context_len, table in zip(meta.query_lens, meta.context_lens, meta.block_tables):
        k, v = gather_kv(kv_cache, table, context_len)  # [ctx, kv_heads, dim]
        qs = q[start:start + query_len].transpose(0, 1)  # [heads, q_len, dim]
        ks = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, ctx, dim]
        vs = v.transpose(0, 1).repeat_interleave(group, dim=0)
        mask = None
        if query_len > 1:
            rows = torch.arange(query_len, device=q.device).unsqueeze(1) + (context_len - query_len)
            mask = torch.arange(context_len, device=q.device).unsqueeze(0) <= rows  # [q_len, ctx]
        o = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), attn_mask=mask, scale=scale)
        out[start:start + query_len] = o.transpose(0, 1).to(q.dtype)
        start += query_len
    return out


class TorchAttention:
    """The CPU path and the oracle of the Triton kernels."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, kv_cache, meta.slot_mapping)
        return reference_attention(q, kv_cache, meta, scale)
