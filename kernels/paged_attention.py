"""Paged attention for mixed batches: prefill chunks and decode tokens in one launch.

Theory of operation. A program owns one block of query tokens of one sequence and one KV
head. The query heads of that KV group are packed into the rows of the tile (row r is token
r // GROUP, head r % GROUP), so even a single decode token gives a matrix product of GROUP
rows rather than a vector. The program walks the sequence's context through its block table,
BLOCK_N keys at a time, with an online softmax; keys past a query's position are masked
(causal, aligned to the end of the context). With ``num_splits > 1`` (flash-decoding, for
batches too small to fill the GPU) the key range is cut into parts: each part writes its
unnormalised output and its (max, sum) to scratch, and ``_combine_kernel`` merges them.

The launch plan (which program serves which query block, the block-table tensor, the split
count) is built on the host once per step from host lists: no device values are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(Q, Cache, Out, PartOut, PartM, PartL, block_tables, context_lens, query_lens, query_starts,
                      qblock_seq, qblock_first, scale,
                      stride_qt, stride_qh, stride_ot, stride_oh,
                      stride_ckv, stride_cb, stride_cs, stride_ch, stride_bt,
                      stride_ps, stride_pt, stride_ph, stride_ms, stride_mt,
                      num_splits,
                      GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(qblock_seq + pid)
    q_first = tl.load(qblock_first + pid)
    query_len = tl.load(query_lens + seq)
    context_len = tl.load(context_lens + seq)
    q_start = tl.load(query_starts + seq)

    rows = tl.arange(0, BLOCK_M)
    token = q_first + rows // GROUP  # query offset inside this sequence's chunk
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (token < query_len)
    position = context_len - query_len + token  # absolute position of each query row
    d = tl.arange(0, HEAD_DIM)
    q_ptr = Q + (q_start + token)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)

    # Keys this block needs: up to the last query's position; this split's share of them.
    last = tl.minimum(q_first + BLOCK_Q, query_len) - 1
    kv_end = context_len - query_len + last + 1
    per_split = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * per_split
    kv_hi = tl.minimum(kv_end, kv_lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables + seq.to(tl.int64) * stride_bt
    for start in range(kv_lo, kv_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < kv_hi
        block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        kv_off = block * stride_cb + (keys % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        k = tl.load(Cache + kv_off[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(Cache + stride_ckv + kv_off[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [BLOCK_M, BLOCK_N]
        visible = key_ok[None, :] & (keys[None, :] <= position[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new

    row = (q_start + token).to(tl.int64)
    if SPLIT:
        part = PartOut + split * stride_ps + row[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :]
        tl.store(part, acc, mask=row_ok[:, None])
        stat = split * stride_ms + row * stride_mt + head
        tl.store(PartM + stat, m_i, mask=row_ok)
        tl.store(PartL + stat, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptr = Out + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_kernel(Out, PartOut, PartM, PartL, num_splits, stride_ot, stride_oh, stride_ps, stride_pt, stride_ph,
                    stride_ms, stride_mt, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    m_all = float("-inf")
    for s in range(0, num_splits):
        m_all = tl.maximum(m_all, tl.load(PartM + s * stride_ms + row * stride_mt + head))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = 0.0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s in range(0, num_splits):
        weight = tl.exp(tl.load(PartM + s * stride_ms + row * stride_mt + head) - m_safe)
        total += weight * tl.load(PartL + s * stride_ms + row * stride_mt + head)
        acc += weight * tl.load(PartOut + s * stride_ps + row * stride_pt + head * stride_ph + d)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + row * stride_ot + head * stride_oh + d, out.to(Out.dtype.element_ty))


@dataclass
class AttentionPlan:
    """Host-built launch data for one step, shared by every layer."""

    num_tokens: int
    block_tables: torch.Tensor  # int32 [seqs, max_blocks]
    context_lens: torch.Tensor  # int32 [seqs]
    query_lens: torch.Tensor  # int32 [seqs]
    query_starts: torch.Tensor  # int32 [seqs]
    qblock_seq: torch.Tensor  # int32 [programs]
    qblock_first: torch.Tensor  # int32 [programs]
    block_q: int
    num_splits: int


def plan(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], group: int,
         device: torch.device, num_splits: int | None = None, block_m: int = 64, sm_count: int = 132) -> AttentionPlan:
    """Build the launch plan from host lists. ``num_splits`` None: split the key range only for
    decode-only batches too small to fill ``sm_count`` multiprocessors twice over."""
    if not (len(query_lens) == len(context_lens) == len(block_tables)) or not query_lens:
        raise ValueError("query_lens, context_lens and block_tables must be non-empty and of one length")
    if any(q < 1 or q > c for q, c in zip(query_lens, context_lens)):
        raise ValueError("each sequence needs 1 <= query_len <= context_len")
    block_q = 1 if max(query_lens) == 1 else max(1, block_m // group)
    seqs, firsts = [], []
    for i, q in enumerate(query_lens):
        for first in range(0, q, block_q):
            seqs.append(i)
            firsts.append(first)
    if num_splits is None:
        num_splits = 1
        if max(query_lens) == 1:
            programs = len(seqs) * max(1, 8 // group)  # rough: KV heads per sequence are a second grid axis
            longest = max(context_lens)
            while num_splits < 16 and programs * num_splits < 2 * sm_count and longest // (num_splits * 2) >= 256:
                num_splits *= 2
    width = max(len(t) for t in block_tables)
    tables = torch.zeros(len(block_tables), width, dtype=torch.int32)
    for i, t in enumerate(block_tables):
        tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    starts = [0]
    for q in query_lens[:-1]:
        starts.append(starts[-1] + q)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    return AttentionPlan(sum(query_lens), tables.to(device, non_blocking=True), ints(context_lens), ints(query_lens),
                         ints(starts), ints(seqs), ints(firsts), block_q, num_splits)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, attn_plan: AttentionPlan, scale: float,
                    out: torch.Tensor | None = None, block_n: int | None = None) -> torch.Tensor:
    """q [tokens, heads, head_dim]; kv_cache [2, blocks, block_size, kv_heads, head_dim] -> [tokens, heads, head_dim]."""
    tokens, heads, head_dim = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} is not [2, blocks, block, kv_heads, {head_dim}]")
    kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if q.dtype != kv_cache.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q ({q.dtype}) and the cache ({kv_cache.dtype}) must share a float dtype")
    if q.stride(-1) != 1 or not kv_cache.is_contiguous():
        raise ValueError("q needs a contiguous last dimension and the cache must be contiguous")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim {head_dim} must be a power of two >= 16")
    if tokens != attn_plan.num_tokens:
        raise ValueError(f"q has {tokens} tokens, the plan {attn_plan.num_tokens}")
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q")
    block_q = attn_plan.block_q
    block_m = max(16, triton.next_power_of_2(block_q * group))
    block_n = block_n or 64
    splits = attn_plan.num_splits
    programs = attn_plan.qblock_seq.shape[0]
    if splits > 1:
        part = torch.empty(splits, tokens, heads, head_dim, dtype=torch.float32, device=q.device)
        part_m = torch.empty(splits, tokens, heads, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part = part_m = part_l = out  # unused
    _attention_kernel[(programs, kv_heads, splits)](
        q, kv_cache, out, part, part_m, part_l, attn_plan.block_tables, attn_plan.context_lens,
        attn_plan.query_lens, attn_plan.query_starts, attn_plan.qblock_seq, attn_plan.qblock_first, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), attn_plan.block_tables.stride(0),
        part.stride(0) if splits > 1 else 0, part.stride(1) if splits > 1 else 0, part.stride(2) if splits > 1 else 0,
        part_m.stride(0) if splits > 1 else 0, part_m.stride(1) if splits > 1 else 0,
        splits, GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, SPLIT=splits > 1)
    if splits > 1:
        _combine_kernel[(tokens, heads)](out, part, part_m, part_l, splits, out.stride(0), out.stride(1),
                                         part.stride(0), part.stride(1), part.stride(2), part_m.stride(0),
                                         part_m.stride(1), HEAD_DIM=head_dim)
    return out
