"""How much an e4m3 KV cache (``--kv-cache-dtype fp8``) costs in accuracy, against bf16.

    python -m bench.kv_fp8_accuracy                        # presets small and llama-1b, on CPU
    python -m bench.kv_fp8_accuracy --models tiny --prompts 4

For each model, the next-token logits of the same prompts (pseudo-random token ids, 64 to ~600
tokens, every prompt's K/V written to the cache and read back by its own attention) three ways:
the float32 model with a float32 cache (the reference), the bf16 model with a bf16 cache (the
baseline: what bf16 itself costs), and the bf16 model with an e4m3 cache. Reported against the
bf16 baseline: relative RMS error of the logits, top-1 agreement and the mean KL divergence, and
each against the float32 reference. Random-weight presets have no trained outliers (real models'
keys often do), so this bounds the quantization error of the mechanism, not of a given checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def next_token_logits(model_name: str, dtype: str, kv_cache_dtype: str, prompts: list[list[int]],
                      device: str) -> torch.Tensor:
    """[prompts, vocab] float32: one prefill step of every prompt, the logits of its last token."""
    from server.engine import EngineConfig, LLMEngine
    from server.loader import load
    from server.sampling import SamplingParams

    loaded = load(model_name, dtype, device)
    longest = max(len(p) for p in prompts)
    engine = LLMEngine(loaded.model, loaded.config, loaded.tokenizer,
                       EngineConfig(max_num_seqs=len(prompts), max_num_batched_tokens=sum(len(p) for p in prompts),
                                    kv_cache_blocks=sum(-(-len(p) // 16) + 1 for p in prompts),
                                    max_model_len=longest + 16, kv_cache_dtype=kv_cache_dtype))
    for i, prompt in enumerate(prompts):
        engine.add(f"p{i}", prompt, SamplingParams(max_tokens=1))
    batch = engine.batcher.schedule()
    assert len(batch) == len(prompts) and all(item.is_last_chunk for item in batch)
    return engine._run(batch).float().cpu()


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, float]:
    """(relative RMS error, top-1 agreement, mean KL(want || got)) of two [prompts, vocab] logits."""
    rel = ((got - want).pow(2).mean() / want.var()).sqrt().item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    return rel, top1, kl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_fp8_accuracy")
    parser.add_argument("--models", default="small,llama-1b", help="comma-separated presets")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per model")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.prompts < 1:
        print("kv_fp8_accuracy: --prompts must be >= 1", file=sys.stderr)
        return 2
    from server.model_config import PRESETS

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in PRESETS]
    if unknown or not models:
        print(f"kv_fp8_accuracy: unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    for name in models:
        vocab = PRESETS[name].vocab_size
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(1, vocab, (64 + (i * 37) % 536,), generator=gen).tolist() for i in range(args.prompts)]
        logits = {}
        for label, dtype, kv in (("float32", "float32", "auto"), ("bf16", "bfloat16", "auto"),
                                 ("bf16 + fp8 KV", "bfloat16", "fp8")):
            started = time.perf_counter()
            logits[label] = next_token_logits(name, dtype, kv, prompts, args.device)
            print(f"  {name}: {label} done in {time.perf_counter() - started:.1f} s", flush=True)
        fp8_vs_bf16 = compare(logits["bf16 + fp8 KV"], logits["bf16"])
        fp8_vs_ref = compare(logits["bf16 + fp8 KV"], logits["float32"])
        bf16_vs_ref = compare(logits["bf16"], logits["float32"])
        rows.append((name, fp8_vs_bf16, fp8_vs_ref, bf16_vs_ref))
    print(f"\n{args.prompts} prompts per model, {args.device}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; next-token logits compared (relative RMS error, top-1 agreement, KL)\n")
    print("| model | fp8 KV vs bf16 KV | fp8 KV vs float32 | bf16 KV vs float32 (baseline) |")
    print("| --- | --- | --- | --- |")
    for name, *cells in rows:
        text = [f"{rel:.2%}, top-1 {top1:.0%}, KL {kl:.1e}" for rel, top1, kl in cells]
        print(f"| {name} | {' | '.join(text)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
