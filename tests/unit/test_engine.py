"""The real engine on the tiny preset: batch invariance, preemption, prefix cache, stops, resume."""

from __future__ import annotations

import pytest
import torch

from server.engine import EngineConfig, LLMEngine
from server.loader import load
from server.sampling import SamplingParams

TINY = load("tiny", "float32", "cpu")


def engine(**kw) -> LLMEngine:
    return LLMEngine(TINY.model, TINY.config, TINY.tokenizer, EngineConfig(**{"kv_cache_blocks": 256, **kw}))


def run(eng: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
        outputs: dict[str, list[int]] | None = None) -> dict[str, tuple[list[int], str]]:
    for rid, (prompt, params) in requests.items():
        eng.add(rid, prompt, params, (outputs or {}).get(rid))
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    reasons: dict[str, str] = {}
    for _ in range(10_000):
        if not eng.has_work():
            break
        for out in eng.step():
            got[out.request_id] += out.token_ids
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
    return {rid: (got[rid], reasons[rid]) for rid in requests}


def mixed_requests() -> dict[str, tuple[list[int], SamplingParams]]:
    requests = {}
    for i in range(16):
        prompt = TINY.tokenizer.encode(f"request {i}: " + "lorem ipsum " * (i * 3 % 17))
        params = SamplingParams(max_tokens=8 + (i * 5) % 24, ignore_eos=True) if i % 2 == 0 else \
            SamplingParams(max_tokens=8 + (i * 7) % 24, seed=1000 + i, temperature=0.9, top_p=0.9, top_k=50,
                           ignore_eos=True)
        requests[f"r{i}"] = (prompt, params)
    return requests


def test_tokens_are_the_same_alone_and_in_a_chunked_preempting_batch():
    requests = mixed_requests()
    alone = {rid: run(engine(), {rid: req})[rid] for rid, req in requests.items()}
    busy = engine(max_num_seqs=16, max_num_batched_tokens=48, kv_cache_blocks=40, block_size=8)
    together = run(busy, requests)
    assert busy.batcher.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert together == alone


def test_prefix_cache_hits_give_identical_output():
    shared = TINY.tokenizer.encode("a long shared system prompt " * 6)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    reference = run(engine(), {"b": (shared + [65, 66], params)})["b"]
    eng = engine()
    run(eng, {"a": (shared + [70], params)})
    hits_before = eng.blocks.prefix_hits
    assert run(eng, {"b": (shared + [65, 66], params)})["b"] == reference
    assert eng.blocks.prefix_hits - hits_before == (len(shared) + 1) // 16


def test_a_resumed_request_continues_exactly():
    prompt = TINY.tokenizer.encode("resume me")
    for params in (SamplingParams(max_tokens=20, ignore_eos=True),
                   SamplingParams(max_tokens=20, seed=9, temperature=1.0, ignore_eos=True)):
        full, _ = run(engine(), {"x": (prompt, params)})["x"]
        rest, reason = run(engine(), {"x": (prompt, params)}, {"x": full[:7]})["x"]
        assert full[:7] + rest == full and reason == "length"


def test_stop_string_across_tokens_ends_generation():
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    for n in range(50):
        prompt = TINY.tokenizer.encode(f"find a stop {n}")
        tokens, _ = run(engine(), {"x": (prompt, params)})["x"]
        at = next((i for i in range(1, len(tokens) - 1)
                   if all(32 <= t < 127 for t in tokens[i:i + 2]) and tokens[i] not in tokens[:i]), None)
        if at is not None:
            break
    else:
        pytest.fail("no printable two-byte window found")
    stop = bytes(tokens[at:at + 2]).decode()
    cut, reason = run(engine(), {"x": (prompt, SamplingParams(max_tokens=64, ignore_eos=True, stop=(stop,)))})["x"]
    assert reason == "stop" and cut == tokens[:at + 2]


def test_eos_and_stop_token_ids_finish_with_stop():
    prompt = TINY.tokenizer.encode("stop ids")
    tokens, _ = run(engine(), {"x": (prompt, SamplingParams(max_tokens=30, ignore_eos=True))})["x"]
    cut, reason = run(engine(), {"x": (prompt, SamplingParams(max_tokens=30, stop_token_ids=(tokens[5],)))})["x"]
    assert reason == "stop" and cut == tokens[:tokens.index(tokens[5]) + 1]


def test_requests_longer_than_the_context_are_refused():
    eng = engine(max_model_len=64)
    with pytest.raises(ValueError, match="exceed"):
        eng.add("x", [1] * 60, SamplingParams(max_tokens=10))


def test_the_triton_backend_gives_the_torch_backends_tokens():
    """Under TRITON_INTERPRET=1 on CPU (or on a GPU): the whole engine through our kernels
    (attention, KV store, and the fused norms, rotary and SiLU-mul the Triton backend switches on)."""
    pytest.importorskip("triton")
    from server.attention import TritonAttention

    requests = {f"r{i}": (TINY.tokenizer.encode(f"kernel check {i} " * (i + 1)),
                          SamplingParams(max_tokens=6, ignore_eos=True, seed=i, temperature=0.5 * i))
                for i in range(3)}
    torch_run = run(engine(block_size=8), requests)
    triton_engine = LLMEngine(TINY.model, TINY.config, TINY.tokenizer,
                              EngineConfig(kv_cache_blocks=64, block_size=8), backend=TritonAttention())
    assert run(triton_engine, requests) == torch_run
    assert TINY.model.fused and TINY.model.model.layers[0].mlp.ops is not None
    assert run(engine(block_size=8), requests) == torch_run  # and a torch engine switches them off again
    assert not TINY.model.fused and TINY.model.model.layers[0].mlp.ops is None


def test_decode_graph_buffers_give_the_eager_tokens():
    """The static-buffer decode path (padding to a bucket, the pad block, the bucket's plan) on
    CPU: the same forward a CUDA graph records, run without capture, under the interpreter."""
    pytest.importorskip("triton")
    from server.attention import TritonAttention

    requests = {f"g{i}": (TINY.tokenizer.encode(f"graph check {i} " * (i + 2)),
                          SamplingParams(max_tokens=3 + 2 * i, ignore_eos=True, seed=i, temperature=0.7 * i))
                for i in range(3)}  # 3 rows pad to the 4-bucket; as they finish, buckets 2 and 1
    expected = run(engine(block_size=8), requests)  # the torch backend
    graphed = LLMEngine(TINY.model, TINY.config, TINY.tokenizer,
                        EngineConfig(kv_cache_blocks=64, block_size=8, max_num_seqs=4, decode_graphs=True,
                                     max_model_len=128), backend=TritonAttention(min_partition=16))
    assert graphed.graphs is not None and sorted(graphed.graphs.buckets) == [1, 2, 4]
    assert run(graphed, requests) == expected
    assert graphed.graphs.replays >= 6  # decode steps at 3, 2 and 1 running sequences all went through it


def test_static_decode_buffers_plan_as_the_eager_path_and_give_its_logits_bit_for_bit():
    """Why graph and eager decode agree (on an H200 they did not: 3 of 64 greedy streams were
    identical, because the graph split each row's keys by the model's longest context and the
    eager path by the step's). A decode batch through a bucket's static buffers (what a CUDA graph
    records; run here without capture, under the interpreter) is planned as the general path plans
    the same rows, so their logits are the same bits; a plan with other parts changes them."""
    pytest.importorskip("triton")
    from server.attention import TritonAttention

    backend = TritonAttention(sm_count=1024, min_partition=16)  # tiny contexts split into parts of >= 16 keys
    eng = LLMEngine(TINY.model, TINY.config, TINY.tokenizer,
                    EngineConfig(kv_cache_blocks=64, block_size=8, max_num_seqs=4, max_model_len=96),
                    backend=backend)
    graphs = eng.graphs
    assert graphs is not None
    for n in range(1, 5):  # every batch splits as the bucket it is padded to
        launch = graphs.buckets[graphs.bucket_for(n)].meta.plan.launches[0]
        assert backend.decode_splits(n, TINY.config.num_kv_heads) == launch.splits > 1
        assert launch.min_partition == 16
    for i in range(4):
        eng.add(f"s{i}", TINY.tokenizer.encode(f"same plan {i} " * (2 + i)),
                SamplingParams(max_tokens=8, ignore_eos=True))
    eng.step()  # the four prompts
    batch = eng.batcher.schedule()  # four decode rows of 25 to 56 keys: 2 to 4 parts each
    assert [item.num_tokens for item in batch] == [1] * 4
    replays = graphs.replays
    static = eng._run(batch).clone()
    assert graphs.replays == replays + 1
    eng.graphs = None  # the general path, same rows (it rewrites the same K/V)
    assert torch.equal(eng._run(batch), static)
    eng.backend = TritonAttention(sm_count=1024, min_partition=64)  # one part per row
    assert not torch.equal(eng._run(batch), static)


def test_bucket_intervals_hold_no_other_power_of_two():
    """The decode split count follows the next power of two of the row count, so a batch and the
    bucket it pads to split alike only if no power of two lies strictly between them."""
    from server.cuda_graphs import bucket_sizes

    for max_num_seqs in range(1, 300):
        sizes = bucket_sizes(max_num_seqs)
        assert sizes[0] == 1 and sizes[-1] == max_num_seqs and sizes == sorted(set(sizes))
        for low, high in zip(sizes, sizes[1:]):
            assert all((1 << (n - 1).bit_length()) == (1 << (high - 1).bit_length()) for n in range(low + 1, high))


def test_decode_graphs_need_the_triton_backend():
    with pytest.raises(ValueError, match="triton"):
        engine(decode_graphs=True)


def test_warm_up_leaves_the_engine_giving_the_same_tokens():
    """What a CUDA engine runs at start (compile and tune), here through the kernels in the
    interpreter: it writes only free blocks and the pad block, so requests after it are unchanged."""
    pytest.importorskip("triton")
    from server.attention import TritonAttention

    requests = {f"w{i}": (TINY.tokenizer.encode(f"warm {i} " * (3 + 4 * i)),
                          SamplingParams(max_tokens=5, ignore_eos=True, seed=i, temperature=0.6 * i))
                for i in range(2)}
    cold = run(engine(block_size=8), requests)
    warmed = LLMEngine(TINY.model, TINY.config, TINY.tokenizer,
                       EngineConfig(kv_cache_blocks=64, block_size=8, max_num_seqs=3), backend=TritonAttention())
    warmed.warm_up(context=40)
    assert any(cache.abs().sum() > 0 for cache in warmed.kv_caches)  # it did write the scratch blocks
    assert run(warmed, requests) == cold
    with pytest.raises(RuntimeError, match="before the first request"):
        warmed.warm_up()


def test_extreme_sampling_values_are_well_defined():
    """The smallest temperatures mean greedy (dividing by them would give inf and NaN), a top_k
    past the vocabulary means no top-k, the smallest top_p keeps the single best token."""
    import torch

    from server.sampling import SamplingParams, sample

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(dim=-1).tolist()
    tiny = [SamplingParams(max_tokens=1, seed=i, temperature=5e-324) for i in range(4)]
    assert sample(logits, tiny, [0] * 4) == greedy
    sharp = [SamplingParams(max_tokens=1, seed=i, temperature=100.0, top_p=5e-324) for i in range(4)]
    assert sample(logits, sharp, [3] * 4) == greedy
    wide = [SamplingParams(max_tokens=1, seed=i, temperature=1.0, top_k=1 << 20) for i in range(4)]
    assert sample(logits, wide, [0] * 4) == sample(logits, [SamplingParams(max_tokens=1, seed=i, temperature=1.0)
                                                            for i in range(4)], [0] * 4)


def test_an_fp8_kv_cache_calibrates_power_of_two_scales_and_names_itself_in_the_model_id():
    def named(**kw) -> LLMEngine:
        return LLMEngine(TINY.model, TINY.config, TINY.tokenizer, EngineConfig(kv_cache_blocks=64, **kw),
                         model_id=TINY.model_id)

    auto, fp8 = named(), named(kv_cache_dtype="fp8")
    assert fp8.kv_caches[0].dtype == torch.float8_e4m3fn and auto.kv_scales is None
    assert fp8.kv_scales is not None and len(fp8.kv_scales) == TINY.config.num_layers
    for scales in fp8.kv_scales:
        assert scales.shape == (2, TINY.config.num_kv_heads) and scales.dtype == torch.float32
        assert torch.equal(scales, torch.exp2(scales.log2().round()))  # powers of two
    assert fp8.model_id != TINY.model_id == auto.model_id
    again = named(kv_cache_dtype="fp8")
    assert again.model_id == fp8.model_id and all(torch.equal(a, b) for a, b in zip(again.kv_scales, fp8.kv_scales))


def test_an_fp8_kv_cache_serves_alike_on_both_backends_and_close_to_the_models_own_dtype():
    """Greedy tokens over an e4m3 cache: the torch backend and the Triton kernels (interpreted), eagerly
    and through the decode graphs' static buffers, give the same tokens. Against the float32 cache,
    16 prompts' next-token logits (the prompts' K/V read back from the cache) stay close: on the
    tiny preset (head dim 16, random weights) ~11% relative RMS error and 12 of 16 argmaxes
    (bench/kv_fp8_accuracy.py measures larger presets against bf16)."""
    pytest.importorskip("triton")
    from server.attention import TritonAttention

    requests = {f"f{i}": (TINY.tokenizer.encode(f"fp8 cache {i} " * (i + 3)),
                          SamplingParams(max_tokens=6, ignore_eos=True)) for i in range(3)}
    torch_fp8 = run(engine(kv_cache_dtype="fp8", block_size=8), requests)
    for graphs in (False, True):
        triton_fp8 = LLMEngine(TINY.model, TINY.config, TINY.tokenizer,
                               EngineConfig(kv_cache_blocks=64, block_size=8, max_num_seqs=4, decode_graphs=graphs,
                                            max_model_len=128, kv_cache_dtype="fp8"),
                               backend=TritonAttention(min_partition=16))
        assert run(triton_fp8, requests) == torch_fp8

    def next_token_logits(kv_cache_dtype: str) -> torch.Tensor:
        eng = engine(kv_cache_dtype=kv_cache_dtype, max_num_seqs=16, max_num_batched_tokens=4096)
        for i in range(16):
            eng.add(f"p{i}", [1 + (i * 31 + j * 7) % 250 for j in range(64 + 8 * i)], SamplingParams(max_tokens=1))
        return eng._run(eng.batcher.schedule())

    full, fp8 = next_token_logits("auto"), next_token_logits("fp8")
    assert full.shape == fp8.shape == (16, TINY.config.vocab_size)
    assert ((fp8 - full).pow(2).mean() / full.var()).sqrt().item() < 0.2
    assert (fp8.argmax(-1) == full.argmax(-1)).sum().item() >= 10


def test_a_node_advertises_the_model_id_of_its_fp8_engine():
    """What peers compare before stealing: build_engine's id (the node's) must be the engine's, which
    covers an e4m3 cache and its scales; the loader's alone would let fp8 and bf16 nodes mix."""
    from dataclasses import replace

    from p2psched.core.config import NodeConfig
    from p2psched.engine_factory import build_engine

    base = NodeConfig(engine="real", model="tiny", device="cpu", dtype="float32",
                      engine_config=EngineConfig(kv_cache_blocks=64, max_model_len=128))
    plain, plain_ready = build_engine(base)
    fp8, fp8_ready = build_engine(replace(base, engine_config=replace(base.engine_config, kv_cache_dtype="fp8")))
    assert plain_ready.model_id == plain.model_id == TINY.model_id
    assert fp8_ready.model_id == fp8.model_id == fp8._engine.model_id != TINY.model_id
