"""The interleaved (GPT-J) rotary layout of ERNIE 4.5 through the Triton kernel, and a whole ERNIE
model through the Triton backend. Without CUDA under TRITON_INTERPRET=1 (tests/conftest.py);
tolerances as in test_kernels.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels.rotary import rotary_embedding  # noqa: E402
from server.rope import RotaryEmbedding  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3}


def turned_as_complex(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, dim] with dims (2i, 2i+1) read as one complex number, turned by angles [tokens, dim/2]."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    turned = pairs * torch.polar(torch.ones_like(angles), angles).unsqueeze(1)
    return torch.view_as_real(turned).flatten(-2)


def test_the_models_interleaved_rope_turns_adjacent_pairs():
    rope = RotaryEmbedding(16, 64, 500000.0, None, interleaved=True)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 16, generator=gen), torch.randn(5, 2, 16, generator=gen)
    positions = torch.tensor([0, 1, 7, 30, 63])
    angles = torch.atan2(rope.sin, rope.cos).double()[positions]  # [tokens, 8]
    got_q, got_k = rope(positions, q, k)
    assert (got_q.double() - turned_as_complex(q, angles)).abs().max().item() < 1e-5
    assert (got_k.double() - turned_as_complex(k, angles)).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 32), (8, 2, 32), (6, 1, 32), (16, 2, 128)])
def test_interleaved_rotary_matches_the_model_rope(dtype, heads, kv_heads, head_dim):
    """(16, 2, 128) is ERNIE-4.5-0.3B's attention."""
    rope = RotaryEmbedding(head_dim, 512, 500000.0, None, interleaved=True)
    gen = torch.Generator().manual_seed(heads * head_dim)
    q = torch.randn(9, heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(9, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    positions = torch.tensor([0, 1, 2, 100, 511, 7, 7, 300, 64], device=DEVICE)
    rope.rebuild(DEVICE)
    want_q, want_k = rope(positions, q, k)
    rotary_embedding(q, k, positions, rope.cos, rope.sin, interleaved=True)
    assert (q.float() - want_q.float()).abs().max().item() < TOL[dtype]
    assert (k.float() - want_k.float()).abs().max().item() < TOL[dtype]


def test_the_interleaved_rotary_compiles_for_an_h100():
    """The interpreter never meets the compiler (see test_kernels_compile.py): both layouts compiled
    for sm_90, at ERNIE-4.5-0.3B's shape, in a child process that imports triton without TRITON_INTERPRET."""
    from tests.unit.test_kernels_compile import sm90_toolchain_missing

    missing = sm90_toolchain_missing()
    if missing is not None:
        pytest.skip(missing)
    script = ("import torch\n"
              "from tests.unit.test_kernels_compile import Shape, compile_for_sm90, serving_launches\n"
              "launch = serving_launches(Shape(torch.bfloat16, 1024, 3072, 18, 16, 2, 128, 16))['rotary']\n"
              "print(['cubin' in compile_for_sm90(launch, INTERLEAVED=flag).asm for flag in (False, True)])\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2], env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-4000:]
    assert child.stdout.strip().splitlines()[-1] == "[True, True]"


def test_an_ernie_model_through_the_triton_backend_gives_transformers_greedy_tokens(tmp_path):
    """Fused rotary (interleaved), norms, SiLU-mul and paged attention on a random tiny ERNIE 4.5
    with every bias (``use_bias``): the tokens of transformers' greedy search."""
    pytest.importorskip("transformers")
    from server.attention import TritonAttention
    from server.engine import EngineConfig, LLMEngine
    from server.loader import load
    from server.sampling import SamplingParams
    from tests.unit.test_parity import VOCAB, checkpoint

    hf = checkpoint(tmp_path, "ernie-bias", tie=True)
    ours = load(str(tmp_path), "float32", "cpu")
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    reference = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:]
    engine = LLMEngine(ours.model, ours.config, ours.tokenizer, EngineConfig(kv_cache_blocks=32, block_size=8),
                       backend=TritonAttention())
    engine.add("g", ids[0].tolist(), SamplingParams(max_tokens=8, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_work():
        for out in engine.step():
            tokens += out.token_ids
    assert ours.model.fused and ours.model.rope.interleaved
    assert tokens == reference.tolist()
