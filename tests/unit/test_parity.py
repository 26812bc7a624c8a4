"""Parity with Hugging Face transformers (a test-only dependency) on random tiny checkpoints
written with ``save_pretrained``: logits within 1e-4 (float32) and 32 identical greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models  # noqa: E402

from server.attention import AttentionMetadata  # noqa: E402
from server.engine import EngineConfig, LLMEngine  # noqa: E402
from server.errors import ModelLoadError  # noqa: E402
from server.loader import load  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def checkpoint(tmp: Path, kind: str, tie: bool, shards: bool = False):
    torch.manual_seed(0)
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=tie,
                                                                    rope_scaling=LLAMA3_ROPE))
    elif kind == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=tie))
    else:
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, tie_word_embeddings=tie))
    hf.save_pretrained(tmp, safe_serialization=True, max_shard_size="40KB" if shards else "5GB")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(str(tmp / "tokenizer.json"))
    return hf.eval()


@pytest.mark.parametrize("kind, tie, shards", [("llama", False, False), ("llama", True, True),
                                               ("qwen2", False, False), ("mistral", False, True)])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, kind, tie, shards):
    hf = checkpoint(tmp_path, kind, tie, shards)
    if shards:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load(str(tmp_path), "float32", "cpu")
    assert ours.config.num_kv_heads == 2 and ours.config.tie_word_embeddings == tie
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    eng = LLMEngine(ours.model, ours.config, ours.tokenizer, EngineConfig(kv_cache_blocks=32))
    meta = AttentionMetadata([40], [40], [[0, 1, 2]], torch.arange(40), 16)
    logits = ours.model(ids[0], torch.arange(40), eng.kv_caches, meta, eng.backend, torch.arange(40))
    assert (logits - expected).abs().max().item() < 1e-4

    reference = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 40:]
    eng.add("g", ids[0].tolist(), SamplingParams(max_tokens=32, ignore_eos=True))
    tokens: list[int] = []
    while eng.has_work():
        for out in eng.step():
            tokens += out.token_ids
    assert tokens == reference.tolist()


def test_loader_errors_are_one_clear_line(tmp_path):
    checkpoint(tmp_path, "llama", False)
    with pytest.raises(ModelLoadError, match="neither a preset"):
        load(str(tmp_path / "nope"))
    (tmp_path / "tokenizer.json").rename(tmp_path / "tok.bak")
    with pytest.raises(ModelLoadError, match="missing tokenizer.json"):
        load(str(tmp_path))
    (tmp_path / "tok.bak").rename(tmp_path / "tokenizer.json")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ModelLoadError, match=r"mlp.*has shape"):
        load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelLoadError, match="missing tensor"):
        load(str(tmp_path))
