"""Paged attention for mixed batches: prefill chunks and decode tokens in one step.

Theory of operation. A program owns one block of query tokens of one sequence, one KV head and
one part of the keys. The query heads of that KV group are packed into the rows of the tile
(row r is token r // GROUP, head r % GROUP), so even a single decode token gives a matrix
product of GROUP rows rather than a vector. The program walks its keys through the block table,
BLOCK_N keys at a time, with an online softmax. Keys every row may see (up to the first row's
position) are read without masks; only the last stretch, where the causal mask (aligned to the
end of the context) cuts through the tile, pays for masking.

A step is served by up to two launches that write disjoint rows of the output: decode tokens
(one query each, a 16-row tile) and prefill chunks (a tall tile, BLOCK_M rows, so K/V tiles are
reused by many queries). The grid's first axis is the KV head, so the programs that run side by
side read neighbouring stretches of the cache (a key's heads lie next to each other); prefill
query blocks are launched longest span first, so the causal tail is short.

A decode row's keys may be cut into up to ``splits`` parts (flash-decoding, when the batch is too
small to fill the GPU). ``splits`` comes from the work available: sequences x KV heads against
the multiprocessors (``decode_splits``). Each row cuts its own context into equal parts of
``context / splits`` keys rounded up to a multiple of ``min_partition`` (``part_length``), so a long
row gets up to ``splits`` parts (exactly ``splits`` at multiples of ``splits * min_partition``;
just past one, the rounding leaves about half as many) and a short one a single part; each part
writes its unnormalised output and
(max, sum) to scratch and ``_combine_kernel`` merges a row's parts in one vector step. A row's
parts depend only on its own context and (``splits``, ``min_partition``), never on the grid:
the grid's third axis is an upper bound, and programs past a row's parts exit at once. So one
row gives the same floats in any batch that shares ``splits``, padded or not, replayed or
launched (``decode_splits`` takes the batch's size class only, never a context length).

Compilation. Triton compiles one variant per specialization key: the constexprs, and for other
arguments whether an int is 1 or a multiple of 16 and whether a pointer is 16-byte aligned.
Arguments that change from step to step (the block-table width, scratch strides, the split count,
index tensors that are views into one upload) are excluded with ``do_not_specialize`` /
``do_not_specialize_on_alignment``, so serving never compiles (tests/unit/test_kernel_specialization.py
pins the list).

The launch plan (which program serves which query block, the block tables) is built on the host
from host lists and copied to the device in one non-blocking transfer: no device values are
read. On CUDA the tile width, warps and pipeline depth are autotuned once per (kind of launch,
head dim, group, dtype); explicit ``block_n`` skips tuning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
import triton.testing

from .reference import FP8


@triton.jit
def _attend_span(acc, m_i, l_i, q, Cache, table, lo, hi, kv_hi, position, kv_off_head, d, scale, stride_ckv,
                 stride_cb, stride_cs, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
                 PRECISION: tl.constexpr, KV_FP8: tl.constexpr):
    """Online softmax over keys [lo, hi), BLOCK_N at a time; MASKED: keys past ``kv_hi`` or past a row's
    ``position`` are hidden (else every key of the span is visible to every row). KV_FP8: K/V tiles
    are e4m3, widened to q's type (their scales are applied by the caller: K's in ``scale``, V's to
    the output)."""
    # Each tile's block numbers are loaded one tile ahead and carried in registers: K/V addresses that
    # come from a load in their own iteration cost Triton's software pipeliner a stage, and on sm_90
    # it then kept one K/V buffer whatever num_stages said (tests/unit/test_kernels_compile.py).
    keys = lo + tl.arange(0, BLOCK_N)
    block = tl.load(table + keys // BLOCK_SIZE, mask=keys < kv_hi, other=0).to(tl.int64)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < kv_hi
        kv_off = block * stride_cb + (keys % BLOCK_SIZE) * stride_cs + kv_off_head
        ahead = keys + BLOCK_N
        block = tl.load(table + ahead // BLOCK_SIZE, mask=ahead < kv_hi, other=0).to(tl.int64)
        if MASKED:
            k = tl.load(Cache + kv_off[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
            v = tl.load(Cache + stride_ckv + kv_off[:, None] + d[None, :], mask=key_ok[:, None], other=0.0)
        else:
            k = tl.load(Cache + kv_off[:, None] + d[None, :])
            v = tl.load(Cache + stride_ckv + kv_off[:, None] + d[None, :])
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        # Scores in log2 units (scale carries log2(e)): exp2 is the GPU's native exponential. The
        # scale is applied inside the exponent (one multiply-add per score, not a multiply and a
        # subtract); scale > 0, so max(qk) * scale is max(qk * scale) exactly.
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)  # [BLOCK_M, BLOCK_N]
        if MASKED:
            qk = tl.where(key_ok[None, :] & (keys[None, :] <= position[:, None]), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key seen yet
        else:  # every row sees every key of the tile: its maximum is finite
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
            m_safe = m_new
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk * scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _part_length(context_len, splits, min_partition):
    """Keys per part of a row of ``context_len`` keys cut into at most ``splits`` parts (``part_length``)."""
    return tl.cdiv(tl.cdiv(context_len, splits), min_partition) * min_partition


# Index tensors are loaded as scalars or gathers: their alignment buys nothing, and the plan's are views into one
# upload at offsets that change with the batch (kv_scales: read once, a scalar per program).
@triton.jit(do_not_specialize=["stride_bt", "stride_ps", "stride_ms", "splits", "min_partition"],
            do_not_specialize_on_alignment=["block_tables", "context_lens", "query_lens", "query_starts",
                                            "qblock_seq", "qblock_first", "kv_scales"])
def _attention_kernel(Q, Cache, Out, PartOut, PartM, PartL, block_tables, context_lens, query_lens, query_starts,
                      qblock_seq, qblock_first, kv_scales, scale, kv_heads,
                      stride_qt, stride_qh, stride_ot, stride_oh,
                      stride_ckv, stride_cb, stride_cs, stride_ch, stride_bt,
                      stride_ps, stride_pt, stride_ph, stride_ms, stride_mt,
                      splits, min_partition,
                      GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                      KV_FP8: tl.constexpr):
    kv_head = tl.program_id(0)
    pid = tl.program_id(1)
    part = tl.program_id(2)
    seq = tl.load(qblock_seq + pid)
    q_first = tl.load(qblock_first + pid)
    query_len = tl.load(query_lens + seq)
    context_len = tl.load(context_lens + seq)

    # Keys this block needs: up to its last query's position; this part's share of them.
    last = tl.minimum(q_first + BLOCK_Q, query_len) - 1
    kv_end = context_len - query_len + last + 1
    partition = _part_length(context_len, splits, min_partition)  # >= context_len when splits == 1
    kv_lo = part * partition
    if kv_lo >= kv_end:  # the grid is an upper bound; this row has no part here
        return
    kv_hi = tl.minimum(kv_end, kv_lo + partition)
    num_parts = tl.cdiv(kv_end, partition)

    q_start = tl.load(query_starts + seq)
    rows = tl.arange(0, BLOCK_M)
    token = q_first + rows // GROUP  # query offset inside this sequence's chunk
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (token < query_len)
    first_position = context_len - query_len + q_first
    position = first_position + rows // GROUP  # absolute position of each query row
    d = tl.arange(0, HEAD_DIM)
    q_ptr = Q + (q_start + token)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)

    # Whole BLOCK_N tiles that every row sees (keys <= the first row's position) need no mask.
    unmasked = tl.maximum(tl.minimum(kv_hi, first_position + 1) - kv_lo, 0) // BLOCK_N * BLOCK_N
    full_hi = kv_lo + unmasked

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = block_tables + seq.to(tl.int64) * stride_bt
    kv_off_head = kv_head * stride_ch
    if KV_FP8:  # kv_scales [2, kv_heads]: K's scale goes into the scores' scale, V's onto the output
        scale = scale * tl.load(kv_scales + kv_head)
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, q, Cache, table, kv_lo, full_hi, kv_hi, position, kv_off_head, d,
                                 scale, stride_ckv, stride_cb, stride_cs, BLOCK_N, BLOCK_SIZE, False, PRECISION,
                                 KV_FP8)
    acc, m_i, l_i = _attend_span(acc, m_i, l_i, q, Cache, table, full_hi, kv_hi, kv_hi, position, kv_off_head, d,
                                 scale, stride_ckv, stride_cb, stride_cs, BLOCK_N, BLOCK_SIZE, True, PRECISION,
                                 KV_FP8)
    if KV_FP8:
        acc = acc * tl.load(kv_scales + kv_heads + kv_head)

    if num_parts == 1:  # the whole context in one part: normalise and store
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        row = (q_start + token).to(tl.int64)
        o_ptr = Out + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:  # decode rows only (BLOCK_Q == 1): scratch row = program id, merged by _combine_kernel
        part_row = pid.to(tl.int64)
        part_ptr = PartOut + part * stride_ps + part_row * stride_pt + head[:, None] * stride_ph + d[None, :]
        tl.store(part_ptr, acc, mask=row_ok[:, None])
        stat = part * stride_ms + part_row * stride_mt + head
        tl.store(PartM + stat, m_i, mask=row_ok)
        tl.store(PartL + stat, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["splits", "min_partition", "stride_ps", "stride_ms"],
            do_not_specialize_on_alignment=["context_lens", "qblock_seq", "query_starts"])
def _combine_kernel(Out, PartOut, PartM, PartL, context_lens, qblock_seq, query_starts, splits, min_partition,
                    stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ms, stride_mt,
                    MAX_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge the parts of one decode token (program id 1 = its scratch row) for one head (id 0), all
    parts in one vector step: a [MAX_SPLITS, HEAD_DIM] tile, lanes past the row's parts masked (a
    fixed constexpr, so the reduction's order is the same for every split count). A row of one part
    was stored by the attention kernel. The parts' maxima are in log2 units, as the attention kernel
    keeps them."""
    head = tl.program_id(0)
    pid = tl.program_id(1)
    seq = tl.load(qblock_seq + pid)
    context_len = tl.load(context_lens + seq)
    num_parts = tl.cdiv(context_len, _part_length(context_len, splits, min_partition))
    if num_parts == 1:
        return
    part_row = pid.to(tl.int64)
    row = tl.load(query_starts + seq).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    p = tl.arange(0, MAX_SPLITS)
    used = p < num_parts  # every used part holds >= 1 visible key: its max is finite
    stat = p * stride_ms + part_row * stride_mt + head
    m = tl.load(PartM + stat, mask=used, other=float("-inf"))
    weight = tl.where(used, tl.exp2(m - tl.max(m, axis=0)), 0.0)
    total = tl.sum(weight * tl.load(PartL + stat, mask=used, other=0.0), axis=0)
    parts = tl.load(PartOut + p[:, None] * stride_ps + part_row * stride_pt + head * stride_ph + d[None, :],
                    mask=used[:, None], other=0.0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + row * stride_ot + head * stride_oh + d, out.to(Out.dtype.element_ty))


# Candidate launch configurations on CUDA, per kind of launch: (BLOCK_N, warps, stages). Decode
# tiles are short (16 rows), so the question is how many keys to keep in flight; prefill tiles are
# tall and compute-bound. Each candidate is a compile at start-up, so the list stays short. What each
# compiles to on sm_90 (shared memory, K/V buffers): `python -m bench.kernel_asm`. On the H200
# (2026-11-30, before K/V was multi-buffered) the tuner picked (128, 4, 3) for decode and (128, 8, 3)
# and (64, 8, 3) for prefill. Deeper pipelines now cost shared memory, hence fewer programs per
# multiprocessor: the shallow ones stay so the tuner can weigh the two.
DECODE_CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 2), (64, 4, 4), (128, 4, 4)]
PREFILL_CONFIGS = [(64, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4), (128, 8, 2), (64, 8, 2)]


LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))


@functools.cache
def _tuned(kind: str) -> Any:
    """The attention kernel wrapped in Triton's autotuner (CUDA only: tuning times launches)."""
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
               for n, w, s in (DECODE_CONFIGS if kind == "decode" else PREFILL_CONFIGS)]

    def bench(kernel_call: Any, quantiles: Any) -> Any:  # 5 + 25 ms per candidate: start-up stays short
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    return triton.autotune(configs, key=["GROUP", "BLOCK_M", "BLOCK_SIZE", "HEAD_DIM", "KV_FP8"], do_bench=bench)(
        _attention_kernel)


_PICKED: dict[tuple[Any, ...], Any] = {}  # (kind, group, tile rows, block size, head dim, dtypes) -> Config


MIN_PARTITION = 256  # keys per part at least: shorter parts cost more in scratch traffic and merging than they gain
MAX_SPLITS = 64  # parts per decode row at most (the merge kernel's vector width)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis (query blocks of one launch)
WAVES = 2  # split until the programs of a decode launch fill this many waves of multiprocessors


@dataclass
class Launch:
    """One kernel launch of a step: its programs (query block -> sequence, first token)."""

    kind: str  # "decode" (one query per sequence) or "prefill" (chunks of block_q tokens)
    qblock_seq: torch.Tensor  # int32 [programs]
    qblock_first: torch.Tensor  # int32 [programs]
    programs: int
    block_q: int
    splits: int  # parts a row's context is cut into at most (1: whole rows)
    min_partition: int  # keys per part at least (parts are a multiple of it)
    max_parts: int  # the grid's third axis: an upper bound on the parts of any row of the launch


@dataclass
class AttentionPlan:
    """Host-built launch data for one step, shared by every layer."""

    num_tokens: int
    block_tables: torch.Tensor  # int32 [seqs, max_blocks]
    context_lens: torch.Tensor  # int32 [seqs]
    query_lens: torch.Tensor  # int32 [seqs]
    query_starts: torch.Tensor  # int32 [seqs]
    launches: list[Launch]

    @property
    def max_parts(self) -> int:
        return max(launch.max_parts for launch in self.launches)

    def write_decode(self, context_lens: torch.Tensor, tables: torch.Tensor, longest: int | None = None) -> None:
        """Copy one step into a static decode plan (``decode_buffers``): context lengths [rows] and the
        first ``tables.shape[1]`` columns of the block tables [rows, used], int32 host tensors, in place
        (the buffers are a CUDA graph's inputs). ``longest``: size the grid for that context (an eager
        launch); None keeps the grid (a graph, captured for every part a row may have)."""
        self.context_lens.copy_(context_lens, non_blocking=True)
        self.block_tables[:, :tables.shape[1]].copy_(tables, non_blocking=True)
        if longest is not None:
            launch = self.launches[0]
            launch.max_parts = _parts_bound(longest, launch.splits, launch.min_partition)


def part_length(context_len: int, splits: int, min_partition: int) -> int:
    """Keys per part of a row of ``context_len`` keys cut into at most ``splits`` parts: the context
    shared out evenly, rounded up to a multiple of ``min_partition`` (the kernels' rule)."""
    return -(-(-(-context_len // splits)) // min_partition) * min_partition


def _parts_bound(longest: int, splits: int, min_partition: int) -> int:
    """At least the parts of any row of at most ``longest`` keys (the count itself is not monotone)."""
    return max(1, min(splits, -(-longest // min_partition)))


def decode_splits(num_rows: int, kv_heads: int, sm_count: int) -> int:
    """Parts per decode row (1: none), from the work available and the batch's size class only: the
    next power of two of ``num_rows``, never context lengths. A padded CUDA-graph batch and the eager
    batch it stands for (padded to bucket sizes whose intervals hold no other power of two)
    therefore split alike and sum the same floats. While a program per row and KV head fills fewer
    than ``WAVES`` waves of ``sm_count`` multiprocessors, rows are cut into the power of two of parts
    that fills them (at most ``MAX_SPLITS``); how long a part is follows each row's own context."""
    programs = triton.next_power_of_2(max(1, num_rows)) * kv_heads
    if programs >= WAVES * sm_count:
        return 1
    wanted: int = triton.next_power_of_2(-(-WAVES * sm_count // programs))
    return min(MAX_SPLITS, wanted)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for the device: a blocking copy would drain its queue first."""
    return host.to(device, non_blocking=True)


def plan(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], group: int,
         device: torch.device, splits: int = 1, min_partition: int = MIN_PARTITION,
         block_m: int | None = None) -> AttentionPlan:
    """Build the launch plan from host lists. Decode tokens and prefill chunks get a launch each.
    ``splits``: parts a decode row is cut into at most, each a multiple of ``min_partition`` keys
    (1: whole rows; see ``decode_splits``). ``block_m``: rows of a prefill tile (default 128 on
    CUDA, 64 elsewhere)."""
    if not (len(query_lens) == len(context_lens) == len(block_tables)) or not query_lens:
        raise ValueError("query_lens, context_lens and block_tables must be non-empty and of one length")
    if any(q < 1 or q > c for q, c in zip(query_lens, context_lens)):
        raise ValueError("each sequence needs 1 <= query_len <= context_len")
    if not 1 <= splits <= MAX_SPLITS or min_partition < 1:
        raise ValueError(f"splits must be 1..{MAX_SPLITS} and min_partition >= 1, got {splits}, {min_partition}")
    block_m = block_m or (128 if device.type == "cuda" else 64)
    decode = [i for i, q in enumerate(query_lens) if q == 1]
    prefill_q = max(1, block_m // group)
    # Prefill query blocks, the longest key span first: under a causal mask the last block of a
    # chunk has the most keys, and launched last it would run alone at the end.
    blocks = [(context_lens[i] - q + min(first + prefill_q, q), i, first)
              for i, q in enumerate(query_lens) if q > 1 for first in range(0, q, prefill_q)]
    blocks.sort(key=lambda block: -block[0])
    prefill_seqs, prefill_firsts = [block[1] for block in blocks], [block[2] for block in blocks]
    if max(len(decode), len(blocks)) > MAX_GRID_Y:
        raise ValueError(f"{max(len(decode), len(blocks))} query blocks in one launch; at most {MAX_GRID_Y}")
    width = max(len(t) for t in block_tables)
    starts = [0]
    for q in query_lens[:-1]:
        starts.append(starts[-1] + q)
    # One host tensor, one transfer; the plan's tensors are views of it.
    flat: list[int] = []
    for t in block_tables:
        flat += t
        flat += [0] * (width - len(t))
    n = len(query_lens)
    sections = [width * n, n, n, n, len(decode), len(decode), len(prefill_seqs), len(prefill_seqs)]
    flat += context_lens + query_lens + starts + decode + [0] * len(decode) + prefill_seqs + prefill_firsts
    packed = _upload(torch.tensor(flat, dtype=torch.int32), device)
    tables, ctx, qlens, qstarts, dec_seq, dec_first, pre_seq, pre_first = torch.split(packed, sections)
    launches = []
    if decode:
        parts = _parts_bound(max(context_lens[i] for i in decode), splits, min_partition)
        launches.append(Launch("decode", dec_seq, dec_first, len(decode), 1, splits, min_partition, parts))
    if prefill_seqs:
        launches.append(Launch("prefill", pre_seq, pre_first, len(prefill_seqs), prefill_q, 1, min_partition, 1))
    return AttentionPlan(sum(query_lens), tables.view(n, width), ctx, qlens, qstarts, launches)


def decode_buffers(rows: int, max_blocks: int, max_context: int, splits: int, device: torch.device,
                   min_partition: int = MIN_PARTITION) -> AttentionPlan:
    """A static plan for ``rows`` decode tokens (row i is sequence i), its tensors allocated once:
    the inputs of a CUDA graph, filled by ``AttentionPlan.write_decode`` before each run. The grid
    covers every part a row of up to ``max_context`` keys may have; every row starts as context 1
    over block 0."""
    arange = torch.arange(rows, dtype=torch.int32, device=device)
    tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)
    launch = Launch("decode", arange, torch.zeros_like(arange), rows, 1, splits, min_partition,
                    _parts_bound(max_context, splits, min_partition))
    return AttentionPlan(rows, tables, torch.ones_like(arange), torch.ones_like(arange), arange.clone(), [launch])


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, attn_plan: AttentionPlan, scale: float,
                    out: torch.Tensor | None = None, block_n: int | None = None,
                    kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q [tokens, heads, head_dim]; kv_cache [2, blocks, block_size, kv_heads, head_dim] -> [tokens, heads, head_dim].
    ``block_n``: keys per tile, fixed (else autotuned on CUDA, 64 elsewhere). An e4m3 cache (``FP8``)
    needs ``kv_scales``, float32 [2, kv_heads]: K's and V's scale per KV head."""
    tokens, heads, head_dim = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} is not [2, blocks, block, kv_heads, {head_dim}]")
    kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    fp8 = kv_cache.dtype == FP8
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or (q.dtype != kv_cache.dtype and not fp8):
        raise ValueError(f"q ({q.dtype}) and the cache ({kv_cache.dtype}) must share a float dtype, or the "
                         f"cache be {FP8}")
    if fp8 and (kv_scales is None or kv_scales.shape != (2, kv_cache.shape[3]) or kv_scales.dtype != torch.float32
                or not kv_scales.is_contiguous()):
        raise ValueError(f"an {FP8} cache needs kv_scales, contiguous float32 [2, {kv_cache.shape[3]}]")
    if q.stride(-1) != 1 or not kv_cache.is_contiguous():
        raise ValueError("q needs a contiguous last dimension and the cache must be contiguous")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim {head_dim} must be a power of two >= 16")
    if tokens != attn_plan.num_tokens:
        raise ValueError(f"q has {tokens} tokens, the plan {attn_plan.num_tokens}")
    group = heads // kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out  # contiguous: fixed strides
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must match q")
    tune = q.is_cuda and block_n is None
    for launch in attn_plan.launches:
        parts = launch.max_parts
        # scratch [parts, programs, heads, head_dim] (+ max and sum per head), float32; one element when unsplit
        part = torch.empty(parts * launch.programs * heads * head_dim if parts > 1 else 1, dtype=torch.float32,
                           device=q.device)
        part_m = torch.empty(parts * launch.programs * heads if parts > 1 else 1, dtype=torch.float32,
                             device=q.device)
        part_l = torch.empty_like(part_m)
        part_strides = (launch.programs * heads * head_dim, heads * head_dim, head_dim, launch.programs * heads, heads)
        args = (q, kv_cache, out, part, part_m, part_l, attn_plan.block_tables, attn_plan.context_lens,
                attn_plan.query_lens, attn_plan.query_starts, launch.qblock_seq, launch.qblock_first,
                kv_scales if fp8 else kv_cache, scale * LOG2E, kv_heads,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
                attn_plan.block_tables.stride(0), *part_strides, launch.splits, launch.min_partition)
        block_m = max(16, triton.next_power_of_2(launch.block_q * group))  # tl.dot needs >= 16 rows
        meta = dict(GROUP=group, BLOCK_Q=launch.block_q, BLOCK_M=block_m, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=fp8)  # fp32: no TF32
        grid = (kv_heads, launch.programs, parts)
        if tune:
            key = (launch.kind, group, block_m, block_size, head_dim, q.dtype, kv_cache.dtype)
            picked = _PICKED.get(key)
            if picked is None:  # first time: the autotuner times its candidates, then launches the best
                tuner = _tuned(launch.kind)
                tuner[grid](*args, **meta)
                _PICKED[key] = tuner.best_config
            else:  # later: straight to the kernel (the tuner's own lookup costs tens of microseconds)
                _attention_kernel[grid](*args, **meta, **picked.all_kwargs())
        else:
            _attention_kernel[grid](*args, **meta, BLOCK_N=block_n or 64)
        if parts > 1:
            _combine_kernel[(heads, launch.programs)](out, part, part_m, part_l, attn_plan.context_lens,
                                                      launch.qblock_seq, attn_plan.query_starts, launch.splits,
                                                      launch.min_partition, out.stride(0), out.stride(1),
                                                      *part_strides, MAX_SPLITS=MAX_SPLITS, HEAD_DIM=head_dim)
    return out
