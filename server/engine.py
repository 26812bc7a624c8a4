"""The inference engine: add, abort, step. Synchronous and single-owner (one thread calls it).

``step()`` reads as schedule -> run -> postprocess: the batcher picks what to compute, the
model runs one forward pass over the flattened batch, then sampled tokens are appended and
finished sequences are released.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import torch

from kernels.reference import FP8, FP8_MAX

from .attention import AttentionBackend, AttentionMetadata, TorchAttention
from .batcher import Batcher, Scheduled
from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .detokenizer import Decoder, TextStream
from .engine_config import EngineConfig  # also imported from here by older callers
from .model import LlamaModel
from .model_config import ModelConfig
from .sampling import SamplingBatch, SamplingParams, sample_on_device
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None


KV_CALIBRATION_TOKENS = 512  # the prefill that sets an e4m3 cache's scales


class _KVRange(TorchAttention):
    """The torch backend, recording per call (one per layer) each KV head's largest |K| and |V|."""

    def __init__(self) -> None:
        self.amax: list[torch.Tensor] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        self.amax.append(torch.stack([k.abs().amax(dim=(0, 2)), v.abs().amax(dim=(0, 2))]).float())
        return super().forward(q, k, v, kv_cache, meta, scale, kv_scales)


class LLMEngine:
    def __init__(self, model: LlamaModel, cfg: ModelConfig, tokenizer: Decoder, config: EngineConfig,
                 backend: AttentionBackend | None = None, model_id: str = ""):
        self.model = model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.config = config
        self.model_id = model_id
        self.backend = backend or TorchAttention()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, 8192)
        self.kv_dtype = FP8 if config.kv_cache_dtype == "fp8" else self.dtype
        # e4m3 caches: per layer, float32 [2, kv_heads] (K's and V's scales), calibrated once; they
        # decide the tokens, so they are part of the model id (nodes steal only from their like)
        self.kv_scales: list[torch.Tensor] | None = None
        if self.kv_dtype == FP8:
            self.kv_scales = self._calibrate_kv_scales()
            exponents = torch.stack(self.kv_scales).log2().round().int().flatten().tolist()
            self.model_id = hashlib.blake2b(f"{model_id}:kv-fp8:{exponents}".encode(), digest_size=8).hexdigest()
        num_blocks = config.kv_cache_blocks or self._blocks_from_memory()
        # [layers] x [2, num_blocks + 1, block_size, kv_heads, head_dim]; the last block is never
        # handed out: padded rows of a decode graph write their K/V there
        self.kv_caches = [torch.zeros(2, num_blocks + 1, config.block_size, cfg.num_kv_heads, cfg.head_dim,
                                      dtype=self.kv_dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.batcher = Batcher(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self.num_added = 0
        self.eos_token_ids = set(cfg.eos_token_ids)
        if config.decode_graphs and not self.backend.fused_ops:
            raise ValueError("decode graphs need the triton attention backend")
        if self.device.type == "cuda" and self.backend.fused_ops:
            self.warm_up()  # compile and tune before the first request, not during it
        # Triton backend: every all-decode step runs through static padded buffers, replayed from CUDA
        # graphs when decode_graphs is on (see cuda_graphs.py); graphs on or off give the same tokens
        self.graphs: DecodeGraphs | None = self._decode_runner(num_blocks) if self.backend.fused_ops else None
        log.info("engine: %d KV blocks x %d tokens, max %d seqs, %d batched tokens, attention=%s",
                 num_blocks, config.block_size, config.max_num_seqs, config.max_num_batched_tokens, self.backend.name)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def _blocks_from_memory(self) -> int:
        cfg, block = self.cfg, self.config.block_size
        bytes_per_block = 2 * cfg.num_layers * block * cfg.num_kv_heads * cfg.head_dim * self.kv_dtype.itemsize
        if self.config.kv_cache_memory_gib:
            budget = self.config.kv_cache_memory_gib * (1 << 30)
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_memory_fraction
        else:
            wanted = self.config.max_num_seqs * self.max_model_len * bytes_per_block // block
            budget = min(wanted, 2 << 30)
        return max(2, int(budget // bytes_per_block))

    # ---- API ----

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
            output_ids: list[int] | None = None) -> None:
        """Queue a request; ``output_ids`` are tokens already delivered (a resumed request)."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + params.max_tokens > min(self.max_model_len, self.kv_capacity_tokens):
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceed the "
                             f"context this engine can hold ({min(self.max_model_len, self.kv_capacity_tokens)})")
        seq = Sequence(request_id, list(prompt_ids), params, list(output_ids or []))
        if params.stop:
            seq.text = TextStream(self.tokenizer, list(params.stop))
            seq.text.push(seq.output_ids)
        self.seqs[request_id] = seq
        self.batcher.add(seq)
        self.num_added += 1

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.batcher.remove(seq)

    def has_work(self) -> bool:
        return self.batcher.has_work()

    def step(self) -> list[StepOutput]:
        batch = self.batcher.schedule()
        if not batch:
            return []
        sampling = [item.seq for item in batch if item.is_last_chunk]
        params = SamplingBatch.build([s.params for s in sampling], [len(s.output_ids) for s in sampling],
                                     self.device) if sampling else None  # uploaded while the host goes on
        logits = self._run(batch)
        tokens = sample_on_device(logits, params) if params is not None else None  # queued, not waited for
        for item in batch:  # host bookkeeping while the device computes
            item.seq.num_computed += item.num_tokens
            self._seal_full_blocks(item.seq)
        return self._postprocess(sampling, tokens.tolist() if tokens is not None else [])  # the step's one sync

    def warm_up(self, context: int = 2048) -> None:
        """Run the attention backend's warm-up batches (``AttentionBackend.warm_up_batches``) through
        the model on scratch data: every kernel variant serving can launch compiles now, and the
        autotuner times them on reads of ``context`` keys. Prompt rows write their K/V to the first
        free blocks, decode rows to the pad slot; free blocks' contents are never read by a request
        before it writes them. Nothing is sampled."""
        if self.num_added:
            raise RuntimeError("warm_up() runs before the first request: it scribbles on free KV blocks")
        started = time.perf_counter()
        bs = self.config.block_size
        context = max(2, min(context, self.max_model_len, self.blocks.num_blocks * bs))
        blocks = list(range(-(-context // bs)))
        pad_slot = self.blocks.num_blocks * bs  # the spare block no request owns
        for query_lens, context_lens in self.backend.warm_up_batches(self.config.max_num_seqs,
                                                                     self.config.max_num_batched_tokens, context):
            slots = [s for q, c in zip(query_lens, context_lens) for s in (range(c - q, c) if q > 1 else [pad_slot])]
            meta = AttentionMetadata(query_lens, context_lens, [blocks[:-(-c // bs)] for c in context_lens],
                                     torch.tensor(slots, dtype=torch.long, device=self.device), bs)
            tokens = sum(query_lens)
            self.model(torch.zeros(tokens, dtype=torch.long, device=self.device),
                       torch.tensor([c - q + i for q, c in zip(query_lens, context_lens) for i in range(q)],
                                    dtype=torch.long, device=self.device),
                       self.kv_caches, meta, self.backend,
                       torch.tensor([tokens - 1], dtype=torch.long, device=self.device), self.kv_scales)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("engine warm-up (kernel compilation and tuning) took %.1f s", time.perf_counter() - started)

    # ---- internals ----

    def _calibrate_kv_scales(self) -> list[torch.Tensor]:
        """Scales of an e4m3 KV cache, per layer float32 [2, kv_heads]: one prefill of
        ``KV_CALIBRATION_TOKENS`` fixed pseudo-random tokens through the model, K/V in a scratch
        cache of the model's dtype, records each (layer, K or V, KV head)'s largest magnitude; its
        scale is the power of two that brings it to at most half of e4m3's 448 (headroom for larger
        values, which saturate). Powers of two: dequantizing is exact, and a node that measures a
        hair differently lands on the same scales (and model id) unless it is at a boundary."""
        cfg, bs = self.cfg, self.config.block_size
        n = max(2, min(KV_CALIBRATION_TOKENS, self.max_model_len))
        blocks = -(-n // bs)
        scratch = [torch.zeros(2, blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype, device=self.device)
                   for _ in range(cfg.num_layers)]
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
        meta = AttentionMetadata([n], [n], [list(range(blocks))], torch.arange(n, device=self.device), bs)
        recorder = _KVRange()
        self.model(ids.to(self.device), torch.arange(n, device=self.device), scratch, meta, recorder,
                   torch.tensor([n - 1], device=self.device))
        amax = torch.stack(recorder.amax)  # [layers, 2, kv_heads]
        scales = torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-30) / (FP8_MAX / 2))))
        log.info("KV cache in e4m3: scales calibrated on %d tokens (powers of two from 2^%d to 2^%d)", n,
                 int(scales.log2().min()), int(scales.log2().max()))
        return list(scales.unbind(0))

    def _decode_runner(self, num_blocks: int) -> DecodeGraphs:
        capture = self.config.decode_graphs and self.device.type == "cuda"
        graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, self.config.block_size,
                              self.max_model_len, self.config.max_num_seqs, pad_block=num_blocks, capture=capture,
                              kv_scales=self.kv_scales)
        try:
            graphs.warm_up_and_capture(num_blocks)
        except Exception:  # e.g. an op that cannot be captured: launch eagerly (same plan, same tokens)
            log.exception("decode graph capture failed; decode steps run eagerly")
            graphs.stop_capturing()
        return graphs

    def _run(self, batch: list[Scheduled]) -> torch.Tensor:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        bs = self.blocks.block_size
        for item in batch:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_tokens
            token_ids += seq.tokens(start, end)
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            if item.is_last_chunk:
                logit_rows.append(len(token_ids) - 1)
        context_lens = [item.seq.num_computed + item.num_tokens for item in batch]
        tables = [item.seq.block_table for item in batch]
        if self.graphs is not None and len(logit_rows) == len(token_ids) == len(batch):  # decode tokens only
            replayed = self.graphs.run(token_ids, positions, slots, context_lens, tables)
            if replayed is not None:
                return replayed
        # one upload, not waited for (a blocking copy would first drain the device's queue)
        packed = torch.tensor(token_ids + positions + slots + logit_rows, dtype=torch.long).to(self.device,
                                                                                              non_blocking=True)
        ids, pos, slot_mapping, rows = torch.split(packed, [len(token_ids), len(positions), len(slots),
                                                            len(logit_rows)])
        meta = AttentionMetadata(query_lens=[item.num_tokens for item in batch], context_lens=context_lens,
                                 block_tables=tables, slot_mapping=slot_mapping, block_size=bs)
        logits: torch.Tensor = self.model(ids, pos, self.kv_caches, meta, self.backend, rows, self.kv_scales)
        return logits

    def _postprocess(self, sampling: list[Sequence], tokens: list[int]) -> list[StepOutput]:
        outputs = []
        for seq, token in zip(sampling, tokens):
            seq.output_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.abort(seq.request_id)
            outputs.append(StepOutput(seq.request_id, [token], reason))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            return "stop"
        if seq.text is not None:
            seq.text.push([token])
            if seq.text.is_stopped:
                return "stop"
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _seal_full_blocks(self, seq: Sequence) -> None:
        bs = self.blocks.block_size
        while len(seq.block_hashes) < seq.num_computed // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            seq.block_hashes.append(self.blocks.seal(seq.block_table[i], parent, seq.tokens(i * bs, (i + 1) * bs)))
