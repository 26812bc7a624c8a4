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
class DecodeBucket:
    """Decode rows of similar context length, attended in one call."""

    rows: torch.Tensor  # [n] positions of the decode tokens in the flattened batch
    tables: torch.Tensor  # [n, max_blocks] block tables, zero-padded
    mask: torch.Tensor  # [n, 1, 1, max_ctx] True where a key is inside the context


DECODE_BUCKET_ROWS = 16  # rows sorted by context length, cut in groups: little padding, few calls


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor  # [tokens] cache slot (block * block_size + offset) of each new token
    block_size: int
    _decode_plan: list[DecodeBucket] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def query_starts(self) -> list[int]:
        starts = [0]
        for n in self.query_lens[:-1]:
            starts.append(starts[-1] + n)
        return starts

    def decode_plan(self, device: torch.device) -> list[DecodeBucket]:
        """Index tensors for the decode rows, built once per step and shared by every layer."""
        if self._decode_plan is None:
            starts = self.query_starts
            bs = self.block_size
            decode = sorted((i for i, n in enumerate(self.query_lens) if n == 1), key=lambda i: self.context_lens[i])
            self._decode_plan = []
            for at in range(0, len(decode), DECODE_BUCKET_ROWS):
                group = decode[at:at + DECODE_BUCKET_ROWS]
                used = [(self.context_lens[i] + bs - 1) // bs for i in group]
                tables = torch.zeros(len(group), max(used), dtype=torch.long)
                for row, (i, n) in enumerate(zip(group, used)):
                    tables[row, :n] = torch.tensor(self.block_tables[i][:n])
                lens = torch.tensor([self.context_lens[i] for i in group])
                mask = torch.arange(max(used) * bs).unsqueeze(0) < lens.unsqueeze(1)  # [n, max_ctx]
                self._decode_plan.append(DecodeBucket(torch.tensor([starts[i] for i in group], device=device),
                                                      tables.to(device), mask[:, None, None, :].to(device)))
        return self._decode_plan


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
    """Paged, variable-length, causal-to-the-end, grouped-query attention, one sequence at a time.

    The oracle of the kernels: the plainest correct form, float32 throughout."""
    out = torch.empty_like(q)
    start = 0
    for query_len, context_len, table in zip(meta.query_lens, meta.context_lens, meta.block_tables):
        k, v = gather_kv(kv_cache, table, context_len)  # [ctx, kv_heads, dim]
        out[start:start + query_len] = _attend(q[start:start + query_len], k, v, context_len, scale)
        start += query_len
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    # q [q_len, heads, dim]; k, v [ctx, kv_heads, dim] -> [q_len, heads, dim]
    query_len = q.shape[0]
    mask = None
    if query_len > 1:
        rows = torch.arange(query_len, device=q.device).unsqueeze(1) + (context_len - query_len)
        mask = torch.arange(context_len, device=q.device).unsqueeze(0) <= rows  # [q_len, ctx]
    o = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                       v.transpose(0, 1).float(), attn_mask=mask, scale=scale, enable_gqa=True)
    return o.transpose(0, 1).to(q.dtype)


def batched_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, bucket: DecodeBucket,
                             scale: float) -> torch.Tensor:
    """Decode rows (one query each) in one call: K/V gathered into a padded batch, lengths masked.
    q [n, heads, dim] -> [n, heads, dim]."""
    kv = kv_cache[:, bucket.tables].flatten(2, 3)  # [2, n, max_ctx, kv_heads, dim]
    o = F.scaled_dot_product_attention(q.unsqueeze(2).float(), kv[0].transpose(1, 2).float(),  # q [n, heads, 1, dim]
                                       kv[1].transpose(1, 2).float(), attn_mask=bucket.mask, scale=scale,
                                       enable_gqa=True)
    return o.squeeze(2).to(q.dtype)


class TorchAttention:
    """The CPU path: decode rows batched in one call, prefill chunks one sequence at a time."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, kv_cache, meta.slot_mapping)
        if sum(1 for n in meta.query_lens if n == 1) < 2:
            return reference_attention(q, kv_cache, meta, scale)
        out = torch.empty_like(q)
        for bucket in meta.decode_plan(q.device):
            out[bucket.rows] = batched_decode_attention(q[bucket.rows], kv_cache, bucket, scale)
        starts = meta.query_starts
        for i, (query_len, context_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
            if query_len > 1:
                k_i, v_i = gather_kv(kv_cache, meta.block_tables[i], context_len)
                out[starts[i]:starts[i] + query_len] = _attend(q[starts[i]:starts[i] + query_len], k_i, v_i,
                                                               context_len, scale)
        return out
