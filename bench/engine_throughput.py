"""Engine throughput (output tokens/s): our continuous-batching engine beside Hugging Face
``generate`` on a padded batch, same model and weights, same requests, in one run.

    python -m bench.engine_throughput [--model small] [--requests 64] [--device cpu]

64 concurrent requests, prompts of 16-256 tokens, greedy, EOS ignored so every request
produces exactly its length. Two output-length mixes, each measured for both engines:
``uniform`` (16-128 tokens) and ``pareto`` (heavy-tailed, 16-512 tokens: the length mix this
product exists for). Our engine takes all requests at once and continuously batches; HF gets
them as one left-padded batch and runs until the longest output is done. Throughput counts
the requested output tokens only.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from server.engine import EngineConfig, LLMEngine
from server.loader import load
from server.sampling import SamplingParams


def workload(n: int, vocab: int, lengths: str, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(vocab - 2) for _ in range(rng.randint(16, 256))]
        max_tokens = rng.randint(16, 128) if lengths == "uniform" else min(512, int(16 * rng.paretovariate(1.2)))
        out.append((prompt, max_tokens))
    return out


def run_ours(engine: LLMEngine, requests: list[tuple[list[int], int]], progress: Progress) -> tuple[float, int]:
    task = progress.add_task("p2psched engine", total=sum(m for _, m in requests))
    start = time.perf_counter()
    for i, (prompt, max_tokens) in enumerate(requests):
        engine.add(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    produced = 0
    while engine.has_work():
        outs = engine.step()
        produced += sum(len(o.token_ids) for o in outs)
        progress.advance(task, sum(len(o.token_ids) for o in outs))
    return time.perf_counter() - start, produced


def run_hf(hf: torch.nn.Module, requests: list[tuple[list[int], int]], device: str, progress: Progress) -> float:
    task = progress.add_task("HF generate (padded)", total=1)
    longest = max(len(p) for p, _ in requests)
    ids = torch.zeros(len(requests), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, _) in enumerate(requests):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                    max_new_tokens=max(m for _, m in requests), min_new_tokens=max(m for _, m in requests),
                    pad_token_id=0, eos_token_id=None)
    progress.advance(task)
    return time.perf_counter() - start


def hf_twin(loaded, device: str) -> torch.nn.Module:
    import transformers

    cfg = loaded.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(next(loaded.model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(loaded.model.hf_tensors(), strict=False)
    assert not unexpected and all("rotary" in m or "lm_head" in m for m in missing), (missing, unexpected)
    return hf.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_throughput")
    parser.add_argument("--model", default="small", help="preset (default small)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the best time counts")
    parser.add_argument("--lengths", nargs="+", choices=["uniform", "pareto"], default=["uniform", "pareto"])
    args = parser.parse_args(argv)
    console = Console(width=120)
    loaded = load(args.model, args.dtype, args.device)
    hf = hf_twin(loaded, args.device)
    table = Table(title=f"{args.requests} requests, model {args.model}, {args.device}, "
                        f"{torch.get_num_threads()} torch threads, best of {args.rounds}")
    for column in ("lengths", "output tokens", "engine", "seconds", "output tokens/s", "x HF"):
        table.add_column(column, justify="right")
    for lengths in args.lengths:
        requests = workload(args.requests, loaded.config.vocab_size, lengths)
        useful = sum(m for _, m in requests)
        ours_times, hf_times = [], []
        with Progress(console=console, transient=True) as progress:
            for _ in range(args.rounds):
                engine = LLMEngine(loaded.model, loaded.config, loaded.tokenizer,
                                   EngineConfig(max_num_seqs=args.requests,
                                                max_num_batched_tokens=args.max_num_batched_tokens))
                seconds, produced = run_ours(engine, requests, progress)
                assert produced == useful
                ours_times.append(seconds)
                del engine
                hf_times.append(run_hf(hf, requests, args.device, progress))
        ours_s, hf_s = min(ours_times), min(hf_times)
        table.add_row(lengths, str(useful), "HF generate, padded (baseline)", f"{hf_s:.2f}", f"{useful / hf_s:.0f}",
                      "1.00")
        table.add_row(lengths, str(useful), "p2psched engine", f"{ours_s:.2f}", f"{useful / ours_s:.0f}",
                      f"{hf_s / ours_s:.2f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
