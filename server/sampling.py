"""Sampling: greedy, temperature, top-k, top-p, with noise that depends only on (seed, position).

Each sampled row gets Gumbel noise from a counter-based hash of (seed, output position, token
id), computed with int64 tensor arithmetic. A request's token therefore depends only on its own
logits, its seed and the position, never on batch composition, the device's RNG state or which
node runs it; a resumed request continues exactly (the position counts tokens already
delivered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5
_MASK63 = (1 << 63) - 1
_C1, _C2, _C3, _C4 = 0x1E3779B97F4A7C15, 0x3F58476D1CE4E5B9, 0x14D049BB133111EB, 0x2545F4914F6CDD1D


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def is_greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and softmax to NaN: it means greedy.
        return self.temperature < MIN_TEMPERATURE


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows] seeds and positions -> [rows, vocab] uniforms in (0, 1), deterministic everywhere."""
    ids = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    x = (seeds.unsqueeze(1) & _MASK63) * _C1 + positions.unsqueeze(1) * _C2 + ids * _C3  # wraps mod 2^64
    for shift, mult in ((31, _C4), (29, _C2), (32, _C1)):
        x = (x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))) * mult
    x = (x >> 11) & ((1 << 53) - 1)
    return (x.double() + 0.5) / float(1 << 53)


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """logits: [rows, vocab] float32 -> one token id per row."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        scaled = logits[index] / torch.tensor([params[i].temperature for i in rows], device=logits.device).unsqueeze(1)
        scaled = _top_k_top_p(scaled, [params[i] for i in rows])
        seeds = torch.tensor([params[i].seed for i in rows], dtype=torch.int64, device=logits.device)
        pos = torch.tensor([positions[i] for i in rows], dtype=torch.int64, device=logits.device)
        gumbel = -torch.log(-torch.log(hash_uniform(seeds, pos, logits.shape[1])))
        out[index] = (scaled.double() + gumbel).argmax(dim=-1)
    return [int(t) for t in out.tolist()]


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    # logits: [rows, vocab]; masked entries become -inf
    if all(p.top_k <= 0 and p.top_p >= 1.0 for p in params):
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=logits.device)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = ranks >= ks.unsqueeze(1)
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device, dtype=torch.float32)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    drop |= before >= top_ps.unsqueeze(1)
    drop[:, 0] = False  # the best token always stays (a top_p below float32's range rounds to 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
