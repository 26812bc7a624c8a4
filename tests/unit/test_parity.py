"""Parity with Hugging Face transformers (a test-only dependency) on random tiny checkpoints
written with ``save_pretrained``: logits within 1e-4 (float32) and 32 identical greedy tokens.
ERNIE 4.5 also from the same weights in its PaddlePaddle release's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models  # noqa: E402

from server.attention import AttentionMetadata  # noqa: E402
from server.engine import EngineConfig, LLMEngine  # noqa: E402
from server.errors import ModelLoadError  # noqa: E402
from server.loader import load  # noqa: E402
from server.model import LlamaModel  # noqa: E402
from server.model_config import ModelConfig  # noqa: E402
from server.sampling import SamplingParams  # noqa: E402

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def checkpoint(tmp: Path, kind: str, tie: bool, shards: bool = False):
    """A random tiny ``kind`` model saved to ``tmp`` with a word-level tokenizer.json; "ernie-bias":
    ERNIE 4.5 with ``use_bias``."""
    torch.manual_seed(0)
    if kind.startswith("ernie"):
        hf = transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(
            **COMMON, head_dim=16, tie_word_embeddings=tie, use_bias=kind == "ernie-bias"))
    elif kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=tie,
                                                                    rope_scaling=LLAMA3_ROPE))
    elif kind == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=tie))
    else:
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, tie_word_embeddings=tie))
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(".bias"):  # transformers starts biases at zero, where a lost one would go unseen
                param.normal_(0.0, 0.2)
    hf.save_pretrained(tmp, safe_serialization=True, max_shard_size="40KB" if shards else "5GB")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(str(tmp / "tokenizer.json"))
    return hf.eval()


@pytest.mark.parametrize("kind, tie, shards", [("llama", False, False), ("llama", True, True),
                                               ("qwen2", False, False), ("mistral", False, True),
                                               ("ernie", True, False), ("ernie", False, True),
                                               ("ernie-bias", True, False), ("ernie-bias", False, False)])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, kind, tie, shards):
    hf = checkpoint(tmp_path, kind, tie, shards)
    if shards:
        assert (tmp_path / "model.safetensors.index.json").exists()
    assert_matches(hf, tmp_path)


def assert_matches(hf, model_dir: Path) -> None:
    ours = load(str(model_dir), "float32", "cpu")
    assert ours.config.num_kv_heads == 2 and ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
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


def to_paddle_layout(model_dir: Path) -> None:
    """Rewrite a saved ERNIE 4.5 checkpoint as its PaddlePaddle release stores one: ``ernie.``
    prefix, q/k/v packed in ``qkv_proj`` and gate/up in ``up_gate_proj``, linear weights [in, out],
    architecture ``Ernie4_5_ForCausalLM``."""
    hf = load_file(str(model_dir / "model.safetensors"))
    paddle: dict[str, torch.Tensor] = {}
    for name, tensor in hf.items():
        if name.split(".")[-2] in ("k_proj", "v_proj", "up_proj"):
            continue  # packed with q_proj, gate_proj below
        parts = name.split(".")
        if parts[-2] == "q_proj":
            parts[-2] = "qkv_proj"
            tensor = torch.cat([hf[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
        elif parts[-2] == "gate_proj":
            parts[-2] = "up_gate_proj"
            tensor = torch.cat([hf[name.replace("gate_proj", p)] for p in ("gate_proj", "up_proj")])
        if tensor.dim() == 2 and "embed_tokens" not in name:
            tensor = tensor.t()
        paddle[".".join(["ernie", *parts[1:]] if parts[0] == "model" else parts)] = tensor.contiguous()
    (model_dir / "model.safetensors").unlink()
    save_file(paddle, str(model_dir / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "architectures": ["Ernie4_5_ForCausalLM"]}))


@pytest.mark.parametrize("kind, tie", [("ernie", True), ("ernie-bias", False)])
def test_ernie_paddle_checkpoint_matches_transformers(tmp_path, kind, tie):
    hf = checkpoint(tmp_path, kind, tie)
    to_paddle_layout(tmp_path)
    assert_matches(hf, tmp_path)


def test_ernie_0_3b_config_and_tensor_names():
    """ERNIE-4.5-0.3B's config values (transformers' Ernie4_5Config defaults are the same), under the
    Paddle release's architecture name, and on the meta device every tensor name and shape of
    transformers' model at that size."""
    raw = {"architectures": ["Ernie4_5_ForCausalLM"], "model_type": "ernie4_5", "hidden_size": 1024,
           "intermediate_size": 3072, "num_hidden_layers": 18, "num_attention_heads": 16, "num_key_value_heads": 2,
           "head_dim": 128, "rope_theta": 500000, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
           "vocab_size": 103424, "tie_word_embeddings": True, "use_bias": False, "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16"}
    defaults = transformers.Ernie4_5Config().to_dict()
    shared = [k for k in raw if k in defaults and k != "architectures"]
    assert {k: defaults[k] for k in shared} == {k: raw[k] for k in shared}
    assert defaults["rope_parameters"]["rope_theta"] == raw["rope_theta"]
    cfg = ModelConfig.from_hf(raw)
    assert (cfg.head_dim, cfg.q_size, cfg.kv_size, cfg.rope_theta, cfg.rope_interleaved) == (128, 2048, 256, 5e5, True)
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and not cfg.linear_bias
    del raw["tie_word_embeddings"], raw["rms_norm_eps"], raw["rope_theta"]  # transformers' defaults apply
    assert ModelConfig.from_hf(raw) == cfg
    with torch.device("meta"):
        ours = LlamaModel(ModelConfig.from_hf({**raw, "architectures": ["Ernie4_5ForCausalLM"]}))
        theirs = transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config())
    expected = {name: tuple(t.shape) for name, t in theirs.state_dict().items() if name != "lm_head.weight"}
    assert {name: tuple(t.shape) for name, t in ours.hf_tensors().items()} == expected


def test_a_broken_sentencepiece_tokenizer_is_one_clear_line(tmp_path):
    """Without tokenizer.json the loader reads tokenizer.model (tests/unit/test_sentencepiece_tokenizer.py);
    one that is not a sentencepiece model is refused before any weight is read."""
    pytest.importorskip("sentencepiece")
    checkpoint(tmp_path, "ernie", True)
    (tmp_path / "tokenizer.json").rename(tmp_path / "tokenizer.model")
    with pytest.raises(ModelLoadError, match="tokenizer.model: cannot be read as a sentencepiece model") as error:
        load(str(tmp_path))
    assert "\n" not in str(error.value)
