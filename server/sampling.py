"""Sampling on the device, batched: greedy, temperature, top-k, top-p, with noise that depends
only on (seed, output position, token id).

Theory of operation. A step's sampled rows become one ``SamplingBatch``: their parameters in
one host-to-device copy that the host does not wait for. ``sample_on_device`` then works on the
whole [rows, vocab] logits tensor with torch ops and no per-row Python: greedy rows take the
argmax; the others divide by their temperature, mask by top-k and top-p, and take the argmax of
logits + Gumbel noise (the Gumbel-max trick: an exact draw from the softmax). The noise comes
from a counter-based hash of (seed, output position, token id) in int64 tensor arithmetic, so a
request's token depends only on its own logits, its seed and the position: never on batch
composition, the device's RNG state or which node runs it, and a resumed request continues
exactly (the position counts tokens already delivered). The one wait is the caller's, when it
reads the tokens.
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


@dataclass(frozen=True)
class SamplingBatch:
    """The sampled rows' parameters on the device, one row per logits row."""

    seeds: torch.Tensor  # int64 [rows], masked to 63 bits
    positions: torch.Tensor  # int64 [rows]: output tokens already delivered
    top_k: torch.Tensor  # int64 [rows]; <= 0: off
    is_greedy: torch.Tensor  # bool [rows]
    temperature: torch.Tensor  # float64 [rows]; 1 on greedy rows (never used there)
    top_p: torch.Tensor  # float64 [rows]; inf when off (so rounding of the running sum never drops a token)
    sampled_rows: torch.Tensor | None  # int64 [n]: the rows that draw; None when every row does
    all_greedy: bool  # host-side: skip the noise
    any_filter: bool  # host-side: some row uses top-k or top-p (the sort)

    @classmethod
    def build(cls, params: list[SamplingParams], positions: list[int], device: torch.device) -> SamplingBatch:
        """One [7, rows] int64 host tensor (floats as their float64 bits), one non-blocking upload."""
        drawing = [i for i, p in enumerate(params) if not p.is_greedy]
        ints = torch.tensor([[p.seed & _MASK63 for p in params], positions,
                             [p.top_k for p in params], [int(p.is_greedy) for p in params],
                             drawing + [0] * (len(params) - len(drawing))], dtype=torch.int64)
        floats = torch.tensor([[1.0 if p.is_greedy else p.temperature for p in params],
                               [p.top_p if p.top_p < 1.0 else float("inf") for p in params]], dtype=torch.float64)
        packed = torch.cat([ints, floats.view(torch.int64)]).to(device, non_blocking=True)
        seeds, pos, top_k, greedy, rows, temperature, top_p = packed.unbind(0)
        return cls(seeds, pos, top_k, greedy.bool(), temperature.view(torch.float64), top_p.view(torch.float64),
                   rows[:len(drawing)] if 0 < len(drawing) < len(params) else None, not drawing,
                   any(p.top_k > 0 or p.top_p < 1.0 for p in params if not p.is_greedy))


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows] seeds and positions -> [rows, vocab] uniforms in (0, 1), deterministic everywhere."""
    ids = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    x = (seeds.unsqueeze(1) & _MASK63) * _C1 + positions.unsqueeze(1) * _C2 + ids * _C3  # wraps mod 2^64
    for shift, mult in ((31, _C4), (29, _C2), (32, _C1)):
        x = (x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))) * mult
    x = (x >> 11) & ((1 << 53) - 1)
    return (x.double() + 0.5) / float(1 << 53)


def sample_on_device(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [rows, vocab] float32 -> token ids [rows] int64, on the logits' device (not waited
    for). The noise and the filters, a few dozen passes over [rows, vocab], cover only the rows
    that draw; greedy rows are one argmax."""
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    if batch.sampled_rows is None:
        return torch.where(batch.is_greedy, greedy, _draw(logits, batch.temperature, batch.top_k, batch.top_p,
                                                         batch.seeds, batch.positions, batch.any_filter))
    rows = batch.sampled_rows
    drawn = _draw(logits.index_select(0, rows), batch.temperature.index_select(0, rows),
                  batch.top_k.index_select(0, rows), batch.top_p.index_select(0, rows),
                  batch.seeds.index_select(0, rows), batch.positions.index_select(0, rows), batch.any_filter)
    return greedy.index_copy(0, rows, drawn)


def _draw(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
          seeds: torch.Tensor, positions: torch.Tensor, any_filter: bool) -> torch.Tensor:
    scaled = logits / temperature.unsqueeze(1).float()  # [rows, vocab]
    if any_filter:
        scaled = top_k_top_p_mask(scaled, top_k, top_p)
    gumbel = -torch.log(-torch.log(hash_uniform(seeds, positions, logits.shape[1])))
    return (scaled.double() + gumbel).argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token id per row of ``logits`` [rows, vocab] (waits for them)."""
    tokens: list[int] = sample_on_device(logits, SamplingBatch.build(params, positions, logits.device)).tolist()
    return tokens


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab] with the tokens outside each row's top-k and top-p set to -inf. A row
    keeps the tokens at or above a cutoff value, so tied logits are kept or dropped together
    (whatever order the sort left them in); the best token always stays."""
    vocab = logits.shape[1]
    ranked = logits.sort(dim=-1, descending=True).values  # [rows, vocab]
    ks = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    keep = torch.arange(vocab, device=logits.device).unsqueeze(0) < ks.unsqueeze(1)  # a prefix of each row
    probs = ranked.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    keep &= before < top_p.unsqueeze(1).float()  # still a prefix: ``before`` never decreases
    keep[:, 0] = True  # a top_p below float32's range rounds to 0; the best token survives it
    cutoff = ranked.gather(1, keep.sum(dim=-1, keepdim=True) - 1)  # [rows, 1] the last kept value
    return logits.masked_fill(logits < cutoff, float("-inf"))
