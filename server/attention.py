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
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kernels.reference import attend, gather_kv, paged_attention_reference, store_kv


@dataclass
class DecodeBucket:
    """Decode rows of similar context length, attended in one call."""

    rows: torch.Tensor  # [n] positions of the decode tokens in the flattened batch
    tables: torch.Tensor  # [n, max_blocks] block tables, zero-padded
    mask: torch.Tensor  # [n, 1, 1, max_ctx] additive: 0 inside the context, -inf past it


DECODE_BUCKET_ROWS = 16  # rows sorted by context length, cut in groups: little padding, few calls


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor  # [tokens] cache slot (block * block_size + offset) of each new token
    block_size: int
    _decode_plan: list[DecodeBucket] | None = None
    _triton_plan: Any = None  # kernels.paged_attention.AttentionPlan, built by the first layer

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
                inside = torch.arange(max(used) * bs).unsqueeze(0) < lens.unsqueeze(1)  # [n, max_ctx]
                mask = torch.zeros(inside.shape).masked_fill_(~inside, float("-inf"))  # additive, built once
                self._decode_plan.append(DecodeBucket(torch.tensor([starts[i] for i in group], device=device),
                                                      tables.to(device), mask[:, None, None, :].to(device)))
        return self._decode_plan


class AttentionBackend(Protocol):
    name: str
    fused_ops: bool  # the model runs its norms, rotary and SiLU-mul through the Triton kernels too

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Store k/v at their slots, attend; q [tokens, heads, dim] -> [tokens, heads, dim]."""
        ...


def reference_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The oracle: one sequence at a time, float32 inside (``kernels/reference.py``)."""
    return paged_attention_reference(q, kv_cache, meta.query_lens, meta.context_lens, meta.block_tables, scale)


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
    fused_ops = False

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
                out[starts[i]:starts[i] + query_len] = attend(q[starts[i]:starts[i] + query_len], k_i, v_i, scale)
        return out


class TritonAttention:
    """The GPU path: the KV-store and paged-attention kernels of ``kernels/``; the launch plan
    is built once per step on the host and shared by every layer."""

    name = "triton"
    fused_ops = True

    def __init__(self) -> None:
        from kernels import kv_store, paged_attention

        self._store = kv_store.kv_store
        self._attention = paged_attention
        self._sm_count = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() \
            else 132

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._store(k, v, kv_cache, meta.slot_mapping)
        if meta._triton_plan is None:
            meta._triton_plan = self._attention.plan(meta.query_lens, meta.context_lens, meta.block_tables,
                                                     q.shape[1] // kv_cache.shape[3], q.device,
                                                     sm_count=self._sm_count)
        return self._attention.paged_attention(q, kv_cache, meta._triton_plan, scale)


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto``: Triton on CUDA, the torch reference elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        return TritonAttention()
    if name == "torch":
        return TorchAttention()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, triton or torch")
