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

from kernels.reference import FP8, attend, gather_kv, paged_attention_reference, store_kv


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
    plan: Any = None  # the backend's launch data for this step (``AttentionBackend.plan``), shared by every layer

    @property
    def query_starts(self) -> list[int]:
        starts = [0]
        for n in self.query_lens[:-1]:
            starts.append(starts[-1] + n)
        return starts


WarmUpBatch = tuple[list[int], list[int]]  # (query_lens, context_lens) of one scratch forward pass


class AttentionBackend(Protocol):
    name: str
    fused_ops: bool  # the model runs its norms, rotary and SiLU-mul through the Triton kernels too

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, device: torch.device) -> None:
        """Build the step's launch data into ``meta.plan`` (once; every layer shares it). ``forward``
        calls it when the caller has not."""
        ...

    def warm_up_batches(self, max_num_seqs: int, max_num_batched_tokens: int, context: int) -> list[WarmUpBatch]:
        """Batch shapes whose forward passes compile (and tune) every kernel variant serving can launch."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        """Store k/v at their slots, attend; q [tokens, heads, dim] -> [tokens, heads, dim]. An e4m3
        cache comes with ``kv_scales``, float32 [2, kv_heads] (K's and V's per KV head)."""
        ...


def reference_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                        kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: one sequence at a time, float32 inside (``kernels/reference.py``)."""
    return paged_attention_reference(q, kv_cache, meta.query_lens, meta.context_lens, meta.block_tables, scale,
                                     kv_scales)


def batched_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, bucket: DecodeBucket,
                             scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Decode rows (one query each) in one call: K/V gathered into a padded batch, lengths masked.
    q [n, heads, dim] -> [n, heads, dim]."""
    kv = kv_cache[:, bucket.tables].flatten(2, 3)  # [2, n, max_ctx, kv_heads, dim]
    if kv.dtype == FP8:
        if kv_scales is None:
            raise ValueError("an FP8 KV cache needs kv_scales")
        kv = kv.float() * kv_scales[:, None, None, :, None]
    o = F.scaled_dot_product_attention(q.unsqueeze(2).float(), kv[0].transpose(1, 2).float(),  # q [n, heads, 1, dim]
                                       kv[1].transpose(1, 2).float(), attn_mask=bucket.mask, scale=scale,
                                       enable_gqa=True)
    return o.squeeze(2).to(q.dtype)


class TorchAttention:
    """The CPU path: decode rows batched in one call, prefill chunks one sequence at a time."""

    name = "torch"
    fused_ops = False

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, device: torch.device) -> None:
        """Index tensors for the decode rows: sorted by context length, cut in buckets of similar length."""
        if meta.plan is not None:
            return
        starts = meta.query_starts
        bs = meta.block_size
        decode = sorted((i for i, n in enumerate(meta.query_lens) if n == 1), key=lambda i: meta.context_lens[i])
        buckets = []
        for at in range(0, len(decode), DECODE_BUCKET_ROWS):
            group = decode[at:at + DECODE_BUCKET_ROWS]
            used = [(meta.context_lens[i] + bs - 1) // bs for i in group]
            tables = torch.zeros(len(group), max(used), dtype=torch.long)
            for row, (i, n) in enumerate(zip(group, used)):
                tables[row, :n] = torch.tensor(meta.block_tables[i][:n])
            lens = torch.tensor([meta.context_lens[i] for i in group])
            inside = torch.arange(max(used) * bs).unsqueeze(0) < lens.unsqueeze(1)  # [n, max_ctx]
            mask = torch.zeros(inside.shape).masked_fill_(~inside, float("-inf"))  # additive, built once
            buckets.append(DecodeBucket(torch.tensor([starts[i] for i in group], device=device),
                                        tables.to(device), mask[:, None, None, :].to(device)))
        meta.plan = buckets

    def warm_up_batches(self, max_num_seqs: int, max_num_batched_tokens: int, context: int) -> list[WarmUpBatch]:
        return []  # torch ops: nothing to compile

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        store_kv(k, v, kv_cache, meta.slot_mapping, kv_scales)
        if sum(1 for n in meta.query_lens if n == 1) < 2:
            return reference_attention(q, kv_cache, meta, scale, kv_scales)
        self.plan(meta, q.shape[1], kv_cache.shape[3], q.device)
        out = torch.empty_like(q)
        for bucket in meta.plan:
            out[bucket.rows] = batched_decode_attention(q[bucket.rows], kv_cache, bucket, scale, kv_scales)
        starts = meta.query_starts
        for i, (query_len, context_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
            if query_len > 1:
                k_i, v_i = gather_kv(kv_cache, meta.block_tables[i], context_len, kv_scales, q.dtype)
                out[starts[i]:starts[i] + query_len] = attend(q[starts[i]:starts[i] + query_len], k_i, v_i, scale)
        return out


class TritonAttention:
    """The GPU path: the KV-store and paged-attention kernels of ``kernels/``. The launch plan is
    built once per step on the host and shared by every layer. Decode rows split their keys by the
    batch's size class only (``decode_splits``), so a decode batch gives the same floats whether
    it runs eagerly or from a CUDA graph padded to a bucket (``static_decode``)."""

    name = "triton"
    fused_ops = True

    def __init__(self, sm_count: int | None = None, min_partition: int | None = None) -> None:
        """``sm_count``: multiprocessors to fill (default: device 0's, else 132); ``min_partition``:
        the shortest part of a split decode row (tests lower it to split tiny contexts)."""
        from kernels import kv_store, paged_attention

        self._store = kv_store.kv_store
        self._attention = paged_attention
        if sm_count is None:
            sm_count = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() \
                else 132
        self.sm_count = sm_count
        self.min_partition = min_partition or paged_attention.MIN_PARTITION

    def decode_splits(self, num_rows: int, num_kv_heads: int) -> int:
        """Parts per decode row in a batch of ``num_rows`` decode rows (eager or padded alike)."""
        return self._attention.decode_splits(num_rows, num_kv_heads, self.sm_count)

    def plan(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int, device: torch.device) -> None:
        if meta.plan is not None:
            return
        num_decode = sum(1 for n in meta.query_lens if n == 1)
        meta.plan = self._attention.plan(meta.query_lens, meta.context_lens, meta.block_tables,
                                         num_heads // num_kv_heads, device,
                                         splits=self.decode_splits(num_decode, num_kv_heads),
                                         min_partition=self.min_partition)

    def static_decode(self, rows: int, max_blocks: int, num_kv_heads: int, slot_mapping: torch.Tensor,
                      block_size: int) -> AttentionMetadata:
        """Metadata for a decode batch of a fixed ``rows``, its plan in static buffers (a CUDA graph's
        inputs): fill them with ``write_static_decode``. It splits as ``plan`` would for ``rows`` rows."""
        attn_plan = self._attention.decode_buffers(rows, max_blocks, max_blocks * block_size,
                                                   self.decode_splits(rows, num_kv_heads), slot_mapping.device,
                                                   self.min_partition)
        return AttentionMetadata([1] * rows, [1] * rows, [], slot_mapping, block_size, plan=attn_plan)

    @staticmethod
    def write_static_decode(meta: AttentionMetadata, context_lens: torch.Tensor, tables: torch.Tensor,
                            longest: int | None) -> None:
        """One step's context lengths [rows] and block tables [rows, used] (int32, host) into a
        ``static_decode`` plan; ``longest``: size the grid for it (eager), None: keep it (graph)."""
        meta.plan.write_decode(context_lens, tables, longest)

    def warm_up_batches(self, max_num_seqs: int, max_num_batched_tokens: int, context: int) -> list[WarmUpBatch]:
        """Every variant, on ``context``-key reads so the autotuner times realistic ones: a prompt chunk
        (the prefill launch), a full decode batch (the decode launch, tuned), one decode row (split into
        parts when ``context`` is longer than a part: the merge kernel)."""
        chunk = min(context, max_num_batched_tokens)
        return [([chunk], [chunk]), ([1] * max_num_seqs, [context] * max_num_seqs), ([1], [context])]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        self._store(k, v, kv_cache, meta.slot_mapping, kv_scales)
        self.plan(meta, q.shape[1], kv_cache.shape[3], q.device)
        return self._attention.paged_attention(q, kv_cache, meta.plan, scale, kv_scales=kv_scales)


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto``: Triton on CUDA, the torch reference elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        return TritonAttention()
    if name == "torch":
        return TorchAttention()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, triton or torch")
