"""The model's shape, read from a Hugging Face ``config.json`` or a built-in preset.

Supported: Llama-style decoders (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ERNIE 4.5 dense ``Ernie4_5ForCausalLM``): RMSNorm, rotary embeddings
(plain, or ``llama3`` scaling), grouped-query attention, SwiGLU MLP, tied or untied embeddings,
optional qkv bias (Qwen2). ERNIE 4.5 differs from Llama in two ways only: its rotary pairs are
adjacent dims (GPT-J style, ``Family.rope_interleaved``), and ``use_bias`` puts a bias on every
projection but ``lm_head`` (``ModelConfig.linear_bias``). Its Paddle release names the
architecture ``Ernie4_5_ForCausalLM``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    """What an architecture fixes, and the values of the config.json keys it may omit (those of its
    transformers config class)."""

    qkv_bias: bool = False
    rope_interleaved: bool = False  # rotary pairs are dims (2i, 2i+1), not (i, i + head_dim/2)
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0


_LLAMA = Family()
_ERNIE = Family(rope_interleaved=True, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0)
ARCHITECTURES = {"LlamaForCausalLM": _LLAMA, "MistralForCausalLM": _LLAMA, "Qwen2ForCausalLM": Family(qkv_bias=True),
                 "Ernie4_5ForCausalLM": _ERNIE, "Ernie4_5_ForCausalLM": _ERNIE}  # the latter: ERNIE's Paddle release


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    linear_bias: bool = False  # every projection but lm_head has a bias (ERNIE 4.5 use_bias); implies qkv_bias
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ModelLoadError(f"config.json: {message}")

        need(self.architecture in ARCHITECTURES, f"unsupported architecture {self.architecture!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
        need(self.rms_norm_eps > 0 and self.rope_theta > 0, "rms_norm_eps and rope_theta must be > 0")
        need(self.qkv_bias or not self.linear_bias, "linear_bias implies qkv_bias")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(kind in ("llama3", "default"), f"rope_scaling type {kind!r} is not supported (llama3 only)")

    @property
    def rope_interleaved(self) -> bool:
        return ARCHITECTURES[self.architecture].rope_interleaved

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def model_id(self, weights_digest: str) -> str:
        """Names the model: config and weights. Nodes steal only from peers with the same id."""
        text = json.dumps({k: v for k, v in asdict(self).items() if k != "extra"}, sort_keys=True)
        return hashlib.blake2b((text + weights_digest).encode(), digest_size=8).hexdigest()

    @classmethod
    def from_hf(cls, raw: dict[str, Any], eos_override: tuple[int, ...] = ()) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(f"unsupported architecture {archs or raw.get('model_type')!r}; "
                                 f"supported: {', '.join(ARCHITECTURES)}")
        family = ARCHITECTURES[arch]
        try:
            if float(raw.get("compression_ratio", 1.0)) != 1.0:  # ERNIE's Paddle config: positions divided by it
                raise ModelLoadError(f"config.json: compression_ratio {raw['compression_ratio']} is not supported "
                                     f"(1.0 only)")
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            eos = raw.get("eos_token_id")
            eos_ids = eos_override or tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            use_bias = bool(raw.get("use_bias", False))
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", family.rms_norm_eps)),
                rope_theta=float(raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta")
                                 or family.rope_theta),
                rope_scaling=_rope_scaling(raw),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", family.tie_word_embeddings)),
                qkv_bias=family.qkv_bias or bool(raw.get("attention_bias", False)) or use_bias,
                linear_bias=use_bias,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json: missing or invalid field {exc}") from None


def _rope_scaling(raw: dict[str, Any]) -> dict[str, Any] | None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    return dict(scaling)


# Built-in presets: deterministic random weights, no download. "tiny" uses the byte tokenizer.
BYTE_VOCAB = 256 + 2  # bytes, then <bos>=256, <eos>=257
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig("LlamaForCausalLM", BYTE_VOCAB, 64, 128, 2, 4, 2, 16, rms_norm_eps=1e-5,
                        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=256, eos_token_ids=(257,)),
    "small": ModelConfig("LlamaForCausalLM", BYTE_VOCAB, 512, 1376, 6, 8, 4, 64, max_position_embeddings=4096,
                         bos_token_id=256, eos_token_ids=(257,)),
    "llama-1b": ModelConfig("LlamaForCausalLM", 128256, 2048, 8192, 16, 32, 8, 64, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                            max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
                            eos_token_ids=(128001,)),
}
