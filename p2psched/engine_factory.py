"""Building an engine from a node's config (in the engine process), and the node's matching
tokenizer and chat template (in the node process). The one place the scheduler's types meet
torch's world: the node process never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .core.config import NodeConfig
from .core.engine import ChatTemplateFn, Engine, Ready, TextStreamFactory, Tokenizer
from .core.errors import ConfigError

log = logging.getLogger(__name__)


def attention_backend_for(requested: str, device: str, head_dim: int, cuda_graphs: bool) -> str:
    """``triton`` or ``torch`` for this device and model. The kernels serve head dims that are
    powers of two >= 16: ``auto`` falls back to torch (logged) for others, ``triton`` refuses."""
    chosen = ("triton" if device.startswith("cuda") else "torch") if requested == "auto" else requested
    if chosen == "triton" and (head_dim & (head_dim - 1) or head_dim < 16):
        if requested == "triton" or cuda_graphs:
            raise ConfigError(f"the Triton kernels (needed by --attention-backend triton and --cuda-graphs) serve "
                              f"head dims that are powers of two >= 16; this model's is {head_dim}")
        log.warning("head dim %d is not one the Triton kernels serve: attention runs through the torch backend",
                    head_dim)
        return "torch"
    return chosen


def decode_graphs_for(mode: str, backend: str) -> bool:
    """Whether the engine replays decode steps from CUDA graphs: ``--cuda-graphs auto`` wherever
    the Triton kernels run (they run only on CUDA), ``on`` always (checked against the device and
    backend before the model loads), ``off`` never."""
    return mode == "on" or (mode == "auto" and backend == "triton")


def build_engine(config: NodeConfig) -> tuple[Engine, Ready]:
    """The engine and what the node needs to know about it. Raises ``ConfigError`` or
    ``server.errors.ModelLoadError`` with a one-line reason."""
    if config.engine == "sim":
        from .sim_engine import SimEngine

        sim = SimEngine(config.sim, config.engine_config.max_num_seqs)
        return sim, Ready(sim.model_id, sim.limits, ("sim", ""), "", sim.stats())
    import torch

    from server.attention import make_backend
    from server.loader import load

    from .real_engine import RealEngine

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    if config.attention_backend == "triton" and not device.startswith("cuda"):
        raise ConfigError("--attention-backend triton needs a CUDA device (CI checks the kernels with "
                          "TRITON_INTERPRET=1 in tests)")
    if config.cuda_graphs == "on" and (not device.startswith("cuda") or config.attention_backend == "torch"):
        raise ConfigError("--cuda-graphs on needs a CUDA device and the triton attention backend")
    loaded = load(config.model_name, config.dtype, device)
    backend_name = attention_backend_for(config.attention_backend, device, loaded.config.head_dim,
                                         config.cuda_graphs == "on")
    backend = make_backend(backend_name, torch.device(device))
    engine_config = replace(config.engine_config, decode_graphs=decode_graphs_for(config.cuda_graphs, backend_name))
    engine = RealEngine(loaded, engine_config, backend)
    tokenizer = ("hf", str(loaded.path)) if loaded.path is not None else ("bytes", "")
    return engine, Ready(engine.model_id, engine.limits, tokenizer, str(loaded.path or ""), engine.stats())


def build_frontend(ready: Ready) -> tuple[Tokenizer, TextStreamFactory, ChatTemplateFn]:
    """The node's side of the engine: the same tokenizer (prompts in, text out) and chat template."""
    from server.chat_template import ChatTemplate
    from server.detokenizer import TextStream

    kind, path = ready.tokenizer
    tokenizer: Tokenizer
    if kind == "sim":
        from .sim_engine import SimTokenizer

        tokenizer = SimTokenizer()
    elif kind == "hf":  # the model directory: tokenizer.json, else sentencepiece's tokenizer.model
        from server.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(path))
    else:
        from server.tokenizer import ByteTokenizer

        tokenizer = ByteTokenizer()
    template = ChatTemplate.from_model_dir(Path(ready.model_dir)) if ready.model_dir else ChatTemplate()
    return tokenizer, lambda stop: TextStream(tokenizer, stop), template
