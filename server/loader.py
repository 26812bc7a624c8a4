"""Load a model: a built-in preset (deterministic random weights), a local Hugging Face
directory (config.json, *.safetensors with optional index, tokenizer.json or a sentencepiece
tokenizer.model, generation_config.json), or a hub id (``owner/name``) found in the local
Hugging Face cache.
Weights are named as transformers saves them, or as ERNIE's PaddlePaddle release does
(``ernie.*``, see ``LlamaModel.paddle_tensors``). Every problem is a ``ModelLoadError`` with one
clear line.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError
from .hf_cache import is_hub_id, snapshot_dir
from .model import LlamaModel
from .model_config import PRESETS, ModelConfig
from .tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer, read_json

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    config: ModelConfig
    model: LlamaModel
    tokenizer: ByteTokenizer | HFTokenizer | SentencePieceTokenizer
    model_id: str
    name: str
    path: Path | None = None  # the model directory (None for presets)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load(source: str, dtype: str = "auto", device: str = "cpu", seed: int = 0) -> LoadedModel:
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if source in PRESETS:
        return _load_preset(source, torch_dtype, dev, seed)
    if not Path(source).exists() and is_hub_id(source):
        return _load_dir(snapshot_dir(source), torch_dtype, dev, source)
    return _load_dir(Path(source), torch_dtype, dev, Path(source).name)


def _load_preset(name: str, dtype: torch.dtype, device: torch.device, seed: int) -> LoadedModel:
    cfg = PRESETS[name]
    log.info("building preset %r with random weights (seed %d)", name, seed)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty() gives each module its own tensor: tie again
        model.lm_head.weight = model.model.embed_tokens.weight  # type: ignore[assignment]
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.2 if name == "tiny" else 0.02, generator=gen)
    model.rope.rebuild(device)
    model.eval()
    tokenizer = ByteTokenizer() if cfg.vocab_size == ByteTokenizer.vocab_size else _no_tokenizer(name)
    return LoadedModel(cfg, model, tokenizer, cfg.model_id(f"preset:{name}:{seed}:{dtype}"), name)


def _no_tokenizer(name: str) -> ByteTokenizer:
    log.warning("preset %r has no tokenizer; prompts are byte-encoded (throughput measurements only)", name)
    return ByteTokenizer()


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no weight_map")
        files = sorted({root / str(f) for f in weight_map.values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{root}: no *.safetensors weights found")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ModelLoadError(f"{root}: weight shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def _weights_digest(files: list[Path]) -> str:
    """Hash of each shard's safetensors header (names, dtypes, shapes, offsets) and size."""
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(min(n, 100_000_000)))
        h.update(str(f.stat().st_size).encode())
    return h.hexdigest()


def _load_dir(root: Path, dtype: torch.dtype, device: torch.device, model_name: str) -> LoadedModel:
    if not root.is_dir():
        raise ModelLoadError(f"model {str(root)!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    if not (root / "config.json").is_file():
        raise ModelLoadError(f"{root}: missing config.json")
    tokenizer = load_tokenizer(root)  # before the weights, so that a bad one fails fast
    raw = read_json(root / "config.json")
    eos: tuple[int, ...] = ()
    if (root / "generation_config.json").is_file():
        gen_eos = read_json(root / "generation_config.json").get("eos_token_id")
        if gen_eos is not None:
            eos = tuple(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    cfg = ModelConfig.from_hf(raw, eos)
    files = _weight_files(root)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.rope.rebuild(device)
    from safetensors import SafetensorError, safe_open

    targets = model.paddle_tensors() if _is_paddle_checkpoint(files[0]) else model.hf_tensors()
    seen: set[str] = set()
    for i, f in enumerate(files):
        log.info("loading weights %d/%d: %s", i + 1, len(files), f.name)
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    if name not in targets or name in seen:
                        if (name == "lm_head.weight" and cfg.tie_word_embeddings) or "rotary_emb" in name:
                            continue
                        raise ModelLoadError(f"{f.name}: unexpected tensor {name!r} for {cfg.architecture}")
                    tensor = st.get_tensor(name)
                    if not tensor.is_floating_point():
                        raise ModelLoadError(f"{f.name}: tensor {name!r} has dtype {tensor.dtype}, not a float")
                    target = targets[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ModelLoadError(f"{f.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                             f"config.json implies {tuple(target.shape)}")
                    with torch.no_grad():
                        target.copy_(tensor.to(dtype))
                    seen.add(name)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ModelLoadError(f"{f}: cannot read safetensors: {exc}") from None
    expected = set(targets)
    missing = sorted(expected - seen)
    if missing:
        raise ModelLoadError(f"{root}: missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # type: ignore[assignment]
    model.eval()
    # The id covers what changes tokens: config, weights and the dtype they run in.
    return LoadedModel(cfg, model, tokenizer, cfg.model_id(f"{_weights_digest(files)}:{dtype}"), model_name, root)


def _is_paddle_checkpoint(shard: Path) -> bool:
    """Whether the tensors are named as ERNIE's PaddlePaddle release names them (``ernie.*``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), framework="pt", device="cpu") as st:
            return any(name.startswith("ernie.") for name in st.keys())
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"{shard}: cannot read safetensors: {exc}") from None
