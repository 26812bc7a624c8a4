"""Kernels at realistic sizes in bf16 on a real GPU; skipped cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("head_dim, group", [(128, 4), (64, 8), (128, 1)])
def test_mixed_batch_bf16_matches_the_reference(head_dim, group):
    from kernels.paged_attention import paged_attention, plan
    from kernels.reference import paged_attention_reference

    torch.manual_seed(head_dim + group)
    query_lens = [300, 1, 1, 64, 1] + [1] * 11
    context_lens = [300, 2048, 17, 1000, 4000] + [500 + 100 * i for i in range(11)]
    blocks = [(c + 15) // 16 for c in context_lens]
    perm = torch.randperm(sum(blocks)).tolist()
    tables, at = [], 0
    for n in blocks:
        tables.append(perm[at:at + n])
        at += n
    cache = torch.randn(2, sum(blocks), 16, 4, head_dim, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(sum(query_lens), 4 * group, head_dim, dtype=torch.bfloat16, device="cuda")
    expected = paged_attention_reference(q.float(), cache.float(), query_lens, context_lens, tables, 0.1)
    for splits in (1, 8, 64):  # whole rows; rows in parts of >= 256 keys
        out = torch.full_like(q, float("nan"))
        paged_attention(q, cache, plan(query_lens, context_lens, tables, group, q.device, splits=splits), 0.1,
                        out=out)
        assert not torch.isnan(out).any()
        assert (out.float() - expected).abs().max().item() < 2e-2


def test_the_engine_on_cuda_with_and_without_decode_graphs_gives_the_torch_backends_tokens():
    from server.attention import TorchAttention, TritonAttention
    from server.engine import EngineConfig, LLMEngine
    from server.loader import load
    from server.sampling import SamplingParams

    tiny = load("tiny", "float32", "cuda")
    results = []
    for backend, graphs in ((TorchAttention(), False), (TritonAttention(), False), (TritonAttention(), True)):
        engine = LLMEngine(tiny.model, tiny.config, tiny.tokenizer,
                           EngineConfig(kv_cache_blocks=128, block_size=16, max_num_seqs=4, max_model_len=512,
                                        decode_graphs=graphs), backend=backend)
        for i in range(3):
            engine.add(f"r{i}", tiny.tokenizer.encode(f"graph {i} " * (5 + 9 * i)),
                       SamplingParams(max_tokens=6 + 4 * i, ignore_eos=True))
        made: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
        while engine.has_work():
            for out in engine.step():
                made[out.request_id] += out.token_ids
        if graphs:
            assert engine.graphs is not None and engine.graphs.replays > 0
            assert all(b.graph is not None for b in engine.graphs.buckets.values())
        results.append(made)
    assert results[1] == results[0]  # the Triton path (tf32 dots inside) picks the reference's tokens
    assert results[2] == results[1]  # and replaying graphs changes nothing
