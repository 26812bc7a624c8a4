"""A Llama-style decoder (Llama, Mistral, Qwen2, ERNIE 4.5 dense) over a flattened batch and a paged KV cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend, AttentionMetadata
from .model_config import ModelConfig
from .rope import RotaryEmbedding


class FusedOps(NamedTuple):
    """The Triton kernels that replace chains of small torch ops (the GPU path, see ``use_fused_ops``)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool], None]


def load_fused_ops() -> FusedOps:
    from kernels.activation import silu_and_mul
    from kernels.rms_norm import add_rms_norm, rms_norm
    from kernels.rotary import rotary_embedding

    return FusedOps(rms_norm, add_rms_norm, silu_and_mul, rotary_embedding)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops: FusedOps | None = None

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); the fused kernel adds into ``residual`` in place."""
        if self.ops is not None:
            return self.ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        total = x + residual
        return self(total), total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out: torch.Tensor = self.weight * xf.to(x.dtype)
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        # q, k and v projections packed in one matmul: [q_size + 2 * kv_size, hidden]
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.linear_bias)
        self.rope = rope
        self.scale = cfg.head_dim ** -0.5
        self.ops: FusedOps | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.cfg.q_size, self.cfg.kv_size, self.cfg.kv_size], dim=-1)
        q = q.reshape(tokens, self.cfg.num_heads, self.cfg.head_dim)  # [tokens, heads, dim]
        k = k.reshape(tokens, self.cfg.num_kv_heads, self.cfg.head_dim)  # [tokens, kv_heads, dim]
        v = v.reshape(tokens, self.cfg.num_kv_heads, self.cfg.head_dim)
        if self.ops is not None:
            self.ops.rotary(q, k, positions, self.rope.cos, self.rope.sin, self.rope.interleaved)  # in place
        else:
            q, k = self.rope(positions, q, k)
        o = backend.forward(q, k, v, kv_cache, meta, self.scale, kv_scales)  # [tokens, heads, dim]
        out: torch.Tensor = self.o_proj(o.reshape(tokens, self.cfg.q_size))
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.linear_bias)  # packed
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.linear_bias)
        self.ops: FusedOps | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            fused: torch.Tensor = self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))
            return fused
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [tokens, intermediate] each
        out: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), positions, kv_cache, meta, backend, kv_scales)
        h, x = self.post_attention_layernorm.add_forward(attn, x)  # x += attn; h = norm(x)
        out: torch.Tensor = x + self.mlp(h)
        return out


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# Hugging Face tensors that live in a slice of one of our packed parameters.
_PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face's (``model.layers.0.self_attn.o_proj.weight``, ...), except
    that q/k/v and gate/up are packed; ``hf_tensors`` maps HF names onto views of our parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                               cfg.rope_interleaved)
        self.model = Backbone(cfg, rope)
        self.rope = rope
        self.fused = False  # see use_fused_ops
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def use_fused_ops(self, enabled: bool) -> None:
        """Run RMSNorm (with the residual add), rotary and SiLU-mul through Triton kernels: one
        launch each instead of a chain of small torch ops (what bounds a small decode step on a GPU)."""
        ops = load_fused_ops() if enabled else None
        self.fused = enabled
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.ops = ops

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Every Hugging Face tensor name of this model -> the view of our weights it fills."""
        cfg = self.cfg
        splits = {"qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size],
                  "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
        out: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            parts = name.split(".")
            packed = next((p for p in splits if p in parts), None)
            if packed is None:
                out[name] = param.data
                continue
            views = torch.split(param.data, splits[packed], dim=0)
            for hf_name, (target, index) in _PACKED.items():
                if target == packed:
                    out[".".join(hf_name if p == packed else p for p in parts)] = views[index]
        return out

    def paddle_tensors(self) -> dict[str, torch.Tensor]:
        """The same for ERNIE's PaddlePaddle checkpoints (``ernie.layers.0.self_attn.qkv_proj.weight``,
        ...): their q/k/v and gate/up come packed in our order, and a linear layer's weight is stored
        [in, out], so those views are transposed."""
        out: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            paddle_name = name.replace("model.", "ernie.", 1).replace("gate_up_proj", "up_gate_proj")
            is_linear_weight = param.dim() == 2 and "embed_tokens" not in name
            out[paddle_name] = param.data.t() if is_linear_weight else param.data
        return out

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, backend: AttentionBackend, logit_rows: torch.Tensor,
                kv_scales: list[torch.Tensor] | None = None) -> torch.Tensor:
        """token_ids, positions: [tokens]; logit_rows: [n] rows whose logits to return -> [n, vocab] float32.
        ``kv_scales``: per layer, float32 [2, kv_heads], with e4m3 caches (``kernels.reference.FP8``)."""
        if backend.fused_ops != self.fused:
            self.use_fused_ops(backend.fused_ops)
        x = self.model.embed_tokens(token_ids)  # [tokens, hidden]
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches)):
            x = layer(x, positions, kv_cache, meta, backend, kv_scales[i] if kv_scales is not None else None)
        x = self.model.norm(x[logit_rows])  # [n, hidden]
        logits: torch.Tensor = self.lm_head(x).float()
        return logits
