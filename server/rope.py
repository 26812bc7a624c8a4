"""Rotary position embeddings, with the ``llama3`` frequency scaling of Llama 3.x configs.

Two layouts of the rotated pairs within a head: Hugging Face's "rotate half" (Llama, Qwen2,
Mistral), where dims i and i + head_dim/2 are a pair, and the interleaved (GPT-J) one of ERNIE
4.5, where dims 2i and 2i+1 are. Pair i turns by the same angle in both: the tables are shared.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                        device: torch.device | None = None) -> torch.Tensor:
    arange = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device or torch.device("cpu"))
    inv = 1.0 / (theta ** (arange / head_dim))  # [head_dim / 2]
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, (1 - smooth) * inv / factor + smooth * inv, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables; ``forward`` rotates q and k at the given positions."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 interleaved: bool = False):
        super().__init__()
        self._args = (head_dim, max_positions, theta, scaling)
        self.interleaved = interleaved
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.rebuild(torch.device("cpu"))

    def rebuild(self, device: torch.device) -> None:
        """(Re)compute the float32 tables on ``device`` (after ``to_empty`` or a dtype cast)."""
        head_dim, max_positions, theta, scaling = self._args
        cpu = torch.device("cpu")
        inv = inverse_frequencies(head_dim, theta, scaling, cpu)
        positions = torch.arange(max_positions, dtype=torch.float64, device=cpu)
        angles = torch.outer(positions, inv)  # [max_positions, head_dim/2]
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim], positions: [tokens]
        cos = self.cos[positions].unsqueeze(1)  # [tokens, 1, head_dim/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin, self.interleaved), _rotate(k, cos, sin, self.interleaved)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    xf = x.float()
    if interleaved:  # dims 2i and 2i+1 are pair i
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # [tokens, heads, head_dim/2] each
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)
    x1, x2 = xf.chunk(2, dim=-1)  # "rotate half": dims i and i + head_dim/2 are pair i
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
