"""The engine on a real GPU: serving compiles no kernel after warm-up, and decode steps replayed
from CUDA graphs give the tokens of eager decode. Skipped cleanly without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[2]


def make_engine(graphs: bool, max_num_seqs: int = 16, max_num_batched_tokens: int = 512) -> Any:
    from server.attention import TritonAttention
    from server.engine import EngineConfig, LLMEngine
    from server.loader import load

    small = load("small", "bfloat16", "cuda")
    return LLMEngine(small.model, small.config, small.tokenizer,
                     EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  block_size=16, kv_cache_blocks=2048, max_model_len=2048, decode_graphs=graphs),
                     backend=TritonAttention())


def serve(engine: Any, waves: list[list[tuple[int, int, int]]]) -> dict[str, list[int]]:
    """Each wave: (prompt length, max tokens, seed) per request, added when the previous wave has
    run a few steps (so prefill chunks meet running decodes); odd seeds sample, even ones are greedy."""
    from server.sampling import SamplingParams

    made: dict[str, list[int]] = {}
    for wave in waves:
        for length, max_tokens, seed in wave:
            rid = f"r{len(made)}"
            made[rid] = []
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed,
                                    temperature=0.8 if seed % 2 else 0.0, top_p=0.9 if seed % 4 == 1 else 1.0,
                                    top_k=40 if seed % 4 == 3 else -1)
            engine.add(rid, [1 + (seed * 31 + j * 7) % 250 for j in range(length)], params)
        for _ in range(3):
            for out in engine.step():
                made[out.request_id] += out.token_ids
    while engine.has_work():
        for out in engine.step():
            made[out.request_id] += out.token_ids
    return made


VARIED = [  # alone, a few, many; prompt lengths around block and partition edges; prefix repeats
    [(1, 5, 1)], [(2, 3, 2), (15, 9, 3), (16, 4, 4)],
    [(17, 30, 5), (31, 12, 6), (100, 25, 7), (257, 8, 8), (600, 20, 9), (1500, 6, 10), (16, 7, 11)],
    [(n, 4 + n % 13, 20 + n) for n in (3, 64, 65, 129, 300, 511, 512, 513, 700, 1000, 1, 33)],
    [(600, 10, 9), (257, 10, 8)],
]


def probe() -> dict[str, Any]:
    """In a fresh process (no variant compiled by another test): per mode, variants after the
    engine's warm-up (and graph capture) and after serving ``VARIED``."""
    from kernels import compiled_variants

    result: dict[str, Any] = {}
    for mode in ("eager", "graphs"):
        engine = make_engine(graphs=mode == "graphs")
        warmed = compiled_variants()
        serve(engine, VARIED)
        torch.cuda.synchronize()
        result[mode] = {"warmed": warmed, "served": compiled_variants(), "replays": engine.graphs.replays}
        del engine
    return result


def test_serving_compiles_no_kernel_after_warm_up():
    """Every argument that varies while serving is data or excluded from specialization, so a
    varied workload (batch sizes 1-16, prompts of 1-1500 tokens, chunked prefill beside decodes,
    split and unsplit decode rows, greedy and sampled rows) finds every variant compiled."""
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.test_engine_gpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode, counts in result.items():
        assert counts["replays"] > 0, mode
        assert counts["served"] == counts["warmed"], f"{mode}: compiled while serving"


def test_decode_graphs_give_the_eager_tokens():
    """The same seeded requests (greedy and sampled; running batches of 1 to 20 rows, so padded
    buckets too; contexts long enough to split small batches) decoded eagerly and replayed from
    CUDA graphs: identical token streams, because both run one plan on the same padded rows."""
    waves = [[(300 + 37 * i, 24, i) for i in range(n)] for n in (1, 3, 16)]
    eager_engine = make_engine(graphs=False, max_num_seqs=20)
    eager = serve(eager_engine, waves)
    del eager_engine
    graph_engine = make_engine(graphs=True, max_num_seqs=20)
    assert graph_engine.graphs is not None and all(b.graph is not None for b in graph_engine.graphs.buckets.values())
    graphed = serve(graph_engine, waves)
    assert graph_engine.graphs.replays > 0
    assert graphed == eager


if __name__ == "__main__":
    print(json.dumps(probe()))
