"""Batched sampling: greedy, determinism per (seed, position), independence of the batch, masks."""

from __future__ import annotations

import math

import torch

from server.sampling import (
    SamplingBatch,
    SamplingParams,
    sample,
    sample_on_device,
    top_k_top_p_mask,
)

VOCAB = 64


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    x = logits(4)
    params = [SamplingParams(1), SamplingParams(1, seed=3, temperature=1.5), SamplingParams(1, temperature=1e-6),
              SamplingParams(1, seed=4, temperature=0.7, top_k=5)]
    tokens = sample(x, params, [0, 0, 0, 0])
    assert [tokens[0], tokens[2]] == [int(x[0].argmax()), int(x[2].argmax())]
    all_greedy = SamplingBatch.build([SamplingParams(1)] * 4, [0] * 4, x.device)
    assert all_greedy.all_greedy and sample_on_device(x, all_greedy).tolist() == x.argmax(dim=-1).tolist()


def test_a_rows_token_depends_only_on_its_logits_seed_and_position():
    """The same row alone, in a batch in any order, beside greedy and filtered rows: the same
    token; another position or seed: (almost always) another draw."""
    x = logits(6, seed=1)
    params = [SamplingParams(1, seed=100 + i, temperature=0.5 + 0.2 * i, top_p=0.95 if i % 2 else 1.0,
                             top_k=-1 if i % 3 else 20) for i in range(6)]
    params[4] = SamplingParams(1)  # a greedy row in the middle
    positions = [0, 5, 17, 3, 9, 200]
    together = sample(x, params, positions)
    alone = [sample(x[i:i + 1], [params[i]], [positions[i]])[0] for i in range(6)]
    order = [5, 2, 0, 4, 1, 3]
    shuffled = sample(x[order], [params[i] for i in order], [positions[i] for i in order])
    assert together == alone == [shuffled[order.index(i)] for i in range(6)]
    assert sample(x, params, positions) == together  # and again: no hidden RNG state
    flat = torch.zeros(1, VOCAB)
    draws = {sample(flat, [SamplingParams(1, seed=7, temperature=1.0)], [p])[0] for p in range(50)}
    assert len(draws) > 20  # positions give fresh draws
    seeds = {sample(flat, [SamplingParams(1, seed=s, temperature=1.0)], [0])[0] for s in range(50)}
    assert len(seeds) > 20


def test_huge_and_negative_seeds_are_taken_modulo_two_to_the_63():
    x = logits(1, seed=2)
    draw = lambda seed: sample(x, [SamplingParams(1, seed=seed, temperature=1.0)], [4])  # noqa: E731
    assert draw(-5) == draw((1 << 63) - 5) and draw(1 << 64) == draw(0)


def test_draws_follow_the_softmax():
    """Gumbel-max over the hash is an exact draw: 4000 positions of one row land on each token in
    proportion to its probability (deterministic: the same counts every run)."""
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = x.softmax(dim=-1)[0].tolist()
    counts = [0] * 4
    for position in range(4000):
        counts[sample(x, [SamplingParams(1, seed=11, temperature=1.0)], [position])[0]] += 1
    assert all(abs(c / 4000 - p) < 0.03 for c, p in zip(counts, probs))


def test_top_k_and_top_p_keep_a_prefix_of_the_ranking_and_ties_together():
    x = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)],
                      [2.0, 1.0, 1.0, 0.0]])

    def kept(top_k: list[int], top_p: list[float]) -> list[list[int]]:
        masked = top_k_top_p_mask(x, torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float64))
        return [[i for i in range(4) if masked[r, i] > float("-inf")] for r in range(2)]

    assert kept([0, 2], [0.8, math.inf]) == [[0, 1], [0, 1, 2]]  # mass above token 2 is 0.8: not < 0.8; a tie at k
    assert kept([0, 0], [0.81, 0.6]) == [[0, 1, 2], [0, 1, 2]]
    assert kept([1, 1], [math.inf, math.inf]) == [[0], [0]]
    assert kept([0, 0], [1e-30, 0.0]) == [[0], [0]]  # the best token always stays


def test_sampled_tokens_stay_inside_the_mask():
    x = logits(1, seed=5)
    top3 = set(x[0].topk(3).indices.tolist())
    drawn = {sample(x, [SamplingParams(1, seed=1, temperature=5.0, top_k=3)], [p])[0] for p in range(300)}
    assert drawn == top3
    nucleus = {sample(x, [SamplingParams(1, seed=1, temperature=1.0, top_p=0.5)], [p])[0] for p in range(300)}
    ranked = x[0].softmax(dim=-1).sort(descending=True)
    inside = set(ranked.indices[:int((ranked.values.cumsum(0) < 0.5).sum()) + 1].tolist())
    assert nucleus <= inside and len(nucleus) > 1
