"""Every kernel against its torch reference on fresh random inputs.

Without CUDA these run under TRITON_INTERPRET=1 (tests/conftest.py): fp32 and fp16, tiny
shapes. Outputs are poisoned (NaN) before each run and checked to be fully written.
Tolerances: fp32 1e-4 absolute, fp16 5e-3 absolute (fp16 inputs, fp32 accumulation).
"""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.kv_store import kv_store  # noqa: E402
from kernels.paged_attention import paged_attention, plan  # noqa: E402
from kernels.reference import FP8, FP8_MAX, paged_attention_reference, quantize_cache, rms_norm_reference, store_kv  # noqa: E402,E501
from kernels.rms_norm import rms_norm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}


def random_batch(seed: int, query_lens: list[int], context_lens: list[int], kv_heads: int, group: int,
                 head_dim: int, block_size: int, dtype: torch.dtype):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    needed = sum((c + block_size - 1) // block_size for c in context_lens)
    num_blocks = needed + 5
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks scattered through the cache, as after churn
    tables = []
    for c in context_lens:
        n = (c + block_size - 1) // block_size
        tables.append([free.pop() for _ in range(n)])
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    q = torch.randn(sum(query_lens), kv_heads * group, head_dim, generator=gen).to(dtype).to(DEVICE)
    return q, cache, tables


CASES = [  # (query_lens, context_lens): mixes of prefill chunks and decode tokens
    ([1], [1]),  # one sequence, one token
    ([7], [7]),  # one sequence, prefill shorter than a block
    ([1, 1, 1], [5, 17, 33]),  # decode only, lengths off the block size
    ([3, 1, 20, 1], [3, 40, 29, 16]),  # mixed: a chunk continuing a cached prefix, decodes
    ([1, 12], [150, 12]),  # a sequence spanning many blocks beside a fresh prompt
    ([40, 1], [200, 77]),  # a late chunk of a long prompt: unmasked tiles, then the causal edge
]


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_attention_matches_the_reference(group, case, dtype):
    query_lens, context_lens = CASES[case]
    q, cache, tables = random_batch(100 * group + case, query_lens, context_lens, 2, group, 16, 8, dtype)
    expected = paged_attention_reference(q.float(), cache.float(), query_lens, context_lens, tables, 0.3)
    out = torch.full_like(q, float("nan"))
    attn_plan = plan(query_lens, context_lens, tables, group, q.device, block_m=16)
    paged_attention(q, cache, attn_plan, 0.3, out=out, block_n=16)
    assert not torch.isnan(out).any(), "output not fully written"
    assert (out.float() - expected).abs().max().item() < TOL[dtype]


@pytest.mark.parametrize("head_dim", [64, 128])  # the model sizes (Llama-3.2-1B: 64; 8B: 128)
def test_paged_attention_at_model_head_dims(head_dim):
    query_lens, context_lens = [3, 1, 20, 1], [3, 40, 29, 16]
    q, cache, tables = random_batch(head_dim, query_lens, context_lens, 2, 4, head_dim, 16, torch.float16)
    expected = paged_attention_reference(q.float(), cache.float(), query_lens, context_lens, tables, head_dim ** -0.5)
    for splits, min_partition in ((1, 256), (4, 16)):  # whole rows; the 40-key row in parts of 16
        out = torch.full_like(q, float("nan"))
        attn_plan = plan(query_lens, context_lens, tables, 4, q.device, splits=splits, min_partition=min_partition,
                         block_m=16)
        paged_attention(q, cache, attn_plan, head_dim ** -0.5, out=out, block_n=16)
        assert not torch.isnan(out).any()
        assert (out.float() - expected).abs().max().item() < TOL[torch.float16]


@pytest.mark.parametrize("splits,min_partition", [(2, 16), (4, 16), (8, 8), (64, 1)])
@pytest.mark.parametrize("group", [1, 4])
def test_split_kv_decode_matches_the_reference(splits, min_partition, group):
    """Rows of one part and of many, parts past a row's end; (64, 1): the 128-key row in 64 parts of
    2 keys, the merge kernel's full width."""
    query_lens, context_lens = [1, 1, 1, 1], [70, 9, 128, 1]
    q, cache, tables = random_batch(splits + group, query_lens, context_lens, 2, group, 32, 16, torch.float32)
    expected = paged_attention_reference(q, cache, query_lens, context_lens, tables, 0.2)
    out = torch.full_like(q, float("nan"))
    attn_plan = plan(query_lens, context_lens, tables, group, q.device, splits=splits, min_partition=min_partition)
    assert attn_plan.max_parts == min(splits, -(-128 // min_partition))
    paged_attention(q, cache, attn_plan, 0.2, out=out, block_n=16)
    assert not torch.isnan(out).any()
    assert (out - expected).abs().max().item() < TOL[torch.float32]


def test_each_row_cuts_its_own_context_into_equal_parts():
    """A part is the row's context shared out ``splits`` ways, rounded up to ``min_partition``: long
    rows get ``splits`` parts whatever their length, short ones one. The count is not monotone in
    the context (64 keys: 4 parts of 16; 65 keys: 3 of 32), so the grid is bounded by
    ``min(splits, context / min_partition)``: the 64-key row beside the longer one is still whole."""
    from kernels.paged_attention import part_length

    assert [part_length(c, 4, 16) for c in (1, 16, 64, 65, 128, 1000)] == [16, 16, 16, 32, 32, 256]
    assert part_length(131072, 64, 256) == 2048 and part_length(2048, 1, 256) == 2048
    query_lens, context_lens = [1, 1], [64, 65]
    q, cache, tables = random_batch(5, query_lens, context_lens, 2, 4, 32, 16, torch.float32)
    attn_plan = plan(query_lens, context_lens, tables, 4, q.device, splits=4, min_partition=16)
    assert attn_plan.max_parts == 4
    out = torch.full_like(q, float("nan"))
    paged_attention(q, cache, attn_plan, 0.2, out=out, block_n=16)
    assert not torch.isnan(out).any()
    expected = paged_attention_reference(q, cache, query_lens, context_lens, tables, 0.2)
    assert (out - expected).abs().max().item() < TOL[torch.float32]


def test_a_decode_row_gives_the_same_bits_in_any_batch_of_its_split_count():
    """Why eager and graph decode agree: a row's parts depend on its own context and (splits,
    min_partition) only. The row alone, beside a longer row (a wider grid) and in a graph's static
    buffers (a grid for the longest context the model allows) gives identical bits; another split
    count gives other bits: the H200's eager-vs-graph divergence, where the eager split followed
    the step's longest context and the graph's the model's."""
    from kernels.paged_attention import decode_buffers

    q, cache, tables = random_batch(11, [1, 1], [70, 130], 2, 4, 32, 16, torch.float32)

    def attend(query_lens, context_lens, rows, attn_plan):
        return paged_attention(q[:len(query_lens)], cache, attn_plan, 0.2, block_n=16)[:rows]

    def planned(query_lens, context_lens, splits):
        return plan(query_lens, context_lens, tables[:len(query_lens)], 4, q.device, splits=splits, min_partition=16)

    alone = attend([1], [70], 1, planned([1], [70], 4))
    pair = attend([1, 1], [70, 130], 2, planned([1, 1], [70, 130], 4))
    static = decode_buffers(2, 20, 320, 4, q.device, min_partition=16)
    static.write_decode(torch.tensor([70, 130], dtype=torch.int32),
                        torch.tensor([t + [0] * (9 - len(t)) for t in tables], dtype=torch.int32))
    assert static.max_parts == 4 and planned([1], [70], 4).max_parts == 4
    graphed = attend([1, 1], [70, 130], 2, static)
    assert torch.equal(alone[0], pair[0]) and torch.equal(pair, graphed)
    other = attend([1, 1], [70, 130], 2, planned([1, 1], [70, 130], 2))
    assert not torch.equal(other[0], pair[0])
    assert (other - pair).abs().max().item() < TOL[torch.float32]


def test_a_mixed_batch_splits_its_decode_launch_only_and_launches_long_prefill_blocks_first():
    query_lens, context_lens = [1, 9, 1, 30], [70, 30, 128, 100]
    q, cache, tables = random_batch(7, query_lens, context_lens, 2, 4, 32, 16, torch.float32)
    expected = paged_attention_reference(q, cache, query_lens, context_lens, tables, 0.2)
    attn_plan = plan(query_lens, context_lens, tables, 4, q.device, splits=4, min_partition=16, block_m=16)
    assert [(launch.kind, launch.programs, launch.max_parts) for launch in attn_plan.launches] == \
        [("decode", 2, 4), ("prefill", 3 + 8, 1)]  # 128 keys in 4 parts of 32; prefill chunks of 16 // 4 tokens
    prefill = attn_plan.launches[1]
    order = list(zip(prefill.qblock_seq.tolist(), prefill.qblock_first.tolist()))
    # keys each block needs: sequence 3 (70 cached + 30) reaches 100, sequence 1 (21 + 9) 30
    assert order == [(3, f) for f in range(28, -1, -4)] + [(1, 8), (1, 4), (1, 0)]
    out = torch.full_like(q, float("nan"))
    paged_attention(q, cache, attn_plan, 0.2, out=out, block_n=16)
    assert not torch.isnan(out).any()
    assert (out - expected).abs().max().item() < TOL[torch.float32]


def test_the_decode_split_count_follows_the_work_and_the_batch_size_class_only():
    """H200: 132 multiprocessors, 8 KV heads. Rows x KV heads short of two waves are split into the
    power of two of parts that fills them (64 at most); full batches are not; batches of one
    power-of-two class share a split count, and no context length enters it."""
    from kernels.paged_attention import decode_splits

    assert [decode_splits(n, 8, 132) for n in (1, 2, 4, 8, 16, 32, 33, 64, 256)] == \
        [64, 32, 16, 8, 4, 2, 1, 1, 1]
    assert decode_splits(1, 1, 132) == 64  # capped at the merge kernel's width
    assert all(decode_splits(n, 2, 132) == decode_splits(1 << (n - 1).bit_length(), 2, 132)
               for n in range(1, 300))
    tables = [[0] * 64]
    assert plan([1], [1024], tables, 4, torch.device("cpu"), splits=4).max_parts == 4
    assert plan([1], [1024], tables, 4, torch.device("cpu")).max_parts == 1  # splits=1: whole rows
    assert plan([1], [300], tables, 4, torch.device("cpu"), splits=64).max_parts == 2  # parts of >= 256 keys
    assert plan([16], [1024], tables, 4, torch.device("cpu"), splits=4).max_parts == 1  # prefill: never split
    with pytest.raises(ValueError):
        plan([5], [3], [[0]], 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="splits"):
        plan([1], [3], [[0]], 1, torch.device("cpu"), splits=65)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_store_writes_exactly_its_slots(dtype):
    gen = torch.Generator().manual_seed(3)
    cache = torch.full((2, 6, 4, 2, 16), float("nan"), dtype=dtype, device=DEVICE)
    expected = cache.clone()
    slots = torch.tensor([0, 5, 6, 23, 11], device=DEVICE)
    k = torch.randn(5, 2, 16, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(5, 2, 16, generator=gen).to(dtype).to(DEVICE)
    kv_store(k, v, cache, slots)
    store_kv(k, v, expected, slots)
    assert torch.equal(torch.nan_to_num(cache, 7.0), torch.nan_to_num(expected, 7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_matches_the_reference(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(7, hidden, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(hidden, generator=gen).to(dtype).to(DEVICE)
    out = rms_norm(x, w, 1e-5)
    assert (out.float() - rms_norm_reference(x, w, 1e-5).float()).abs().max().item() < TOL[dtype] * 4


def test_launchers_check_their_inputs():
    q, cache, tables = random_batch(0, [2], [2], 2, 2, 16, 8, torch.float32)
    attn_plan = plan([2], [2], tables, 2, q.device)
    with pytest.raises(ValueError, match="share a float dtype"):
        paged_attention(q.half(), cache, attn_plan, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(q[:, :3], cache, attn_plan, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        paged_attention(q[:1], cache, attn_plan, 1.0)
    with pytest.raises(ValueError, match="slot"):
        kv_store(q[:, :2], q[:, :2], cache, torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_rotary_matches_the_model_rope(dtype, heads, kv_heads):
    from kernels.reference import rotary_reference
    from kernels.rotary import rotary_embedding
    from server.rope import RotaryEmbedding

    rope = RotaryEmbedding(32, 512, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    gen = torch.Generator().manual_seed(heads)
    q = torch.randn(9, heads, 32, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(9, kv_heads, 32, generator=gen).to(dtype).to(DEVICE)
    positions = torch.tensor([0, 1, 2, 100, 511, 7, 7, 300, 64], device=DEVICE)
    cos, sin = rope.cos.to(DEVICE), rope.sin.to(DEVICE)
    want_q, want_k = rotary_reference(q, k, positions, cos, sin)
    model_q, model_k = rope(positions, q, k)  # the model's own path agrees with the reference
    assert torch.equal(want_q, model_q) and torch.equal(want_k, model_k)
    rotary_embedding(q, k, positions, cos, sin)
    assert (q.float() - want_q.float()).abs().max().item() < TOL[dtype]
    assert (k.float() - want_k.float()).abs().max().item() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 100])
def test_add_rms_norm_matches_the_reference_and_updates_the_residual(dtype, hidden):
    from kernels.reference import add_rms_norm_reference
    from kernels.rms_norm import add_rms_norm

    gen = torch.Generator().manual_seed(hidden + 1)
    x, residual = (torch.randn(5, hidden, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    w = torch.randn(hidden, generator=gen).to(dtype).to(DEVICE)
    want, want_sum = add_rms_norm_reference(x, residual, w, 1e-6)
    out = add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(residual, want_sum)  # one rounding of the sum, as torch's add
    assert (out.float() - want.float()).abs().max().item() < TOL[dtype] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [48, 1500])  # one tile; several tiles with a ragged last one
def test_silu_and_mul_matches_the_reference(dtype, n):
    from kernels.activation import silu_and_mul
    from kernels.reference import silu_and_mul_reference

    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2 * n, generator=gen).to(dtype).to(DEVICE) * 4
    out = silu_and_mul(x)
    assert out.shape == (3, n)
    assert (out.float() - silu_and_mul_reference(x).float()).abs().max().item() < TOL[dtype] * 4
    with pytest.raises(ValueError, match="2 \\* n"):
        silu_and_mul(x[:, :-1])


def test_the_cuda_autotuners_build_with_their_candidates():
    """Built here, run only on CUDA: a broken tuner definition must fail in CI, not on the GPU."""
    from kernels.paged_attention import DECODE_CONFIGS, PREFILL_CONFIGS, _tuned

    for kind, candidates in (("decode", DECODE_CONFIGS), ("prefill", PREFILL_CONFIGS)):
        tuner = _tuned(kind)
        assert [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuner.configs] == candidates
        assert tuner.keys == ["GROUP", "BLOCK_M", "BLOCK_SIZE", "HEAD_DIM", "KV_FP8"]


def fp8_batch(seed: int, query_lens: list[int], context_lens: list[int], kv_heads: int, group: int,
              dtype: torch.dtype):
    """A random batch over an e4m3 cache: the 16-bit cache quantized with per-head scales of
    different sizes (values spread over e4m3's range, none saturated)."""
    q, cache, tables = random_batch(seed, query_lens, context_lens, kv_heads, group, 32, 8, dtype)
    gen = torch.Generator().manual_seed(seed)
    scales = (torch.rand(2, kv_heads, generator=gen) * 0.05 + 0.005).to(DEVICE)
    quantized = quantize_cache(cache, scales)
    return q, quantized, scales, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 4])
def test_paged_attention_over_an_fp8_cache_matches_the_reference_on_its_dequantized_values(dtype, splits):
    """K/V tiles widened from e4m3 in the kernel, K's scale in the scores, V's on the output (and on
    each part of a split row): the same as attending over the dequantized cache."""
    query_lens, context_lens = [3, 1, 20, 1, 1], [3, 40, 29, 16, 70]
    q, cache, scales, tables = fp8_batch(21 + splits, query_lens, context_lens, 2, 4, dtype)
    assert cache.dtype == FP8
    expected = paged_attention_reference(q.float(), cache, query_lens, context_lens, tables, 0.3, kv_scales=scales)
    out = torch.full_like(q, float("nan"))
    attn_plan = plan(query_lens, context_lens, tables, 4, q.device, splits=splits, min_partition=16, block_m=16)
    paged_attention(q, cache, attn_plan, 0.3, out=out, block_n=16, kv_scales=scales)
    assert not torch.isnan(out).any()
    assert (out.float() - expected).abs().max().item() < TOL[dtype]
    with pytest.raises(ValueError, match="kv_scales"):
        paged_attention(q, cache, attn_plan, 0.3, block_n=16)


def test_kv_store_into_an_fp8_cache_writes_the_references_bytes():
    gen = torch.Generator().manual_seed(5)
    cache = torch.zeros(2, 6, 4, 2, 16, dtype=FP8, device=DEVICE)
    expected = cache.clone()
    slots = torch.tensor([0, 5, 6, 23, 11], device=DEVICE)
    k = (torch.randn(5, 2, 16, generator=gen) * 3).to(torch.float16).to(DEVICE)
    v = (torch.randn(5, 2, 16, generator=gen) * 900).to(torch.float16).to(DEVICE)  # beyond 448: saturated
    scales = torch.tensor([[0.5, 0.02], [1.0, 1.0]], device=DEVICE)
    kv_store(k, v, cache, slots, scales)
    store_kv(k, v, expected, slots, scales)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    assert cache[1].float().abs().max().item() == FP8_MAX  # saturated, not NaN
    with pytest.raises(ValueError, match="kv_scales"):
        kv_store(k, v, cache, slots)
