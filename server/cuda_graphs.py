"""Decode steps replayed from CUDA graphs: one graph per padded batch size.

A decode step of a small model is bound by kernel launches, not by the GPU: each layer is a
dozen launches of a few microseconds each. A CUDA graph records the whole forward pass once
and replays it with one launch. Graphs replay fixed shapes and fixed addresses, so each batch
size bucket (1, 2, 4, ... up to ``max_num_seqs``) owns static input tensors: token ids,
positions, KV slots, context lengths and a block table as wide as the longest context. A step
copies its values into the bucket's inputs (three host-to-device copies), pads the unused rows
(token 0 at position 0, context 1, K/V written to the cache's spare pad block), replays, and
reads the first rows of the logits. Context lengths are read by the kernels from the device,
so one graph serves every length; the split count of the decode launch is fixed per bucket,
sized for the longest context (empty parts cost one early exit).

Only all-decode batches of the Triton backend replay; anything else (a prefill chunk in the
batch, a block table wider than the bucket's) runs eagerly. ``capture=False`` keeps the
static-buffer path but calls the forward instead of replaying (how CPU tests check the padding
and the buffers under the Triton interpreter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .attention import AttentionBackend, AttentionMetadata
from .model import LlamaModel

log = logging.getLogger(__name__)

WARMUP_CONTEXT = 2048  # keys per row while warming up, so the autotuner times realistic reads


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < max_num_seqs:
        sizes.append(min(sizes[-1] * 2, max_num_seqs))
    return sizes


@dataclass
class _Bucket:
    size: int
    longs: torch.Tensor  # int64 [3, size]: token ids, positions, KV slots
    context_lens: torch.Tensor  # int32 [size]
    tables: torch.Tensor  # int32 [size, width]
    meta: AttentionMetadata
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_caches: list[torch.Tensor], backend: AttentionBackend,
                 block_size: int, max_model_len: int, max_num_seqs: int, pad_block: int, capture: bool = True):
        from kernels.paged_attention import AttentionPlan, Launch, decode_splits

        if not backend.fused_ops:
            raise ValueError("decode graphs need the Triton backend")
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.block_size, self.pad_block, self.capture = block_size, pad_block, capture
        self.width = -(-max_model_len // block_size)  # blocks in the longest context
        cfg = model.cfg
        device = kv_caches[0].device
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        self.buckets: dict[int, _Bucket] = {}
        for size in bucket_sizes(max_num_seqs):
            longs = torch.zeros(3, size, dtype=torch.long, device=device)
            context_lens = torch.ones(size, dtype=torch.int32, device=device)
            tables = torch.zeros(size, self.width, dtype=torch.int32, device=device)
            arange = torch.arange(size, dtype=torch.int32, device=device)
            splits = decode_splits(size, max_model_len, cfg.num_heads // cfg.num_kv_heads, sm_count)
            attn_plan = AttentionPlan(size, tables, context_lens, torch.ones_like(arange), arange,
                                      [Launch("decode", arange, torch.zeros_like(arange), size, 1, splits)])
            meta = AttentionMetadata([1] * size, [1] * size, [], longs[2], block_size, _triton_plan=attn_plan)
            self.buckets[size] = _Bucket(size, longs, context_lens, tables, meta)
        self._rows = {size: torch.arange(size, device=device) for size in self.buckets}  # logit rows
        self.replays = 0

    def warm_up_and_capture(self, num_blocks: int) -> None:
        """Run each bucket on long dummy contexts (compiles and tunes the kernels on realistic
        reads; only the pad slot is written), then record its graph. Largest first: one memory pool."""
        if not self.capture:
            return
        context = min(WARMUP_CONTEXT, self.width * self.block_size)
        blocks = -(-context // self.block_size)
        pool = None
        for size in sorted(self.buckets, reverse=True):
            bucket = self.buckets[size]
            # every row a long context over the free (zeroed) blocks; all K/V writes go to the pad slot
            pad_slot = self.pad_block * self.block_size
            self._fill(bucket, [0] * size, [0] * size, [pad_slot] * size, [context] * size,
                       [[(row * blocks + j) % num_blocks for j in range(blocks)] for row in range(size)])
            stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward_static(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            self._fill(bucket, [], [], [], [], [])  # pad rows only: what the graph records reads no real block
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                bucket.logits = self._forward_static(bucket)
            bucket.graph = graph
            pool = graph.pool()
        torch.cuda.synchronize()
        log.info("decode graphs captured for batch sizes %s", sorted(self.buckets))

    def _forward_static(self, bucket: _Bucket) -> torch.Tensor:
        out: torch.Tensor = self.model(bucket.longs[0], bucket.longs[1], self.kv_caches, bucket.meta, self.backend,
                                       self._rows[bucket.size])
        return out

    def _fill(self, bucket: _Bucket, tokens: list[int], positions: list[int], slots: list[int],
              context_lens: list[int], tables: list[list[int]]) -> None:
        """Copy one step's rows into the bucket's inputs, padding the rest. Only the used width of
        the block table is copied: the kernels never read past a row's context."""
        pad = bucket.size - len(tokens)
        pad_slot = self.pad_block * self.block_size
        longs = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [pad_slot] * pad], dtype=torch.long)
        used = max([len(t) for t in tables] + [1])
        rows = [t + [0] * (used - len(t)) for t in tables] + [[self.pad_block] + [0] * (used - 1)] * pad
        bucket.longs.copy_(longs, non_blocking=True)
        bucket.context_lens.copy_(torch.tensor(context_lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        bucket.tables[:, :used].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)

    def run(self, tokens: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor | None:
        """Logits [n, vocab] of one all-decode step, or None when no bucket fits (run it eagerly)."""
        n = len(tokens)
        size = next((s for s in self.buckets if s >= n), None)
        if size is None or any(len(t) > self.width for t in tables):
            return None
        bucket = self.buckets[size]
        self._fill(bucket, tokens, positions, slots, context_lens, tables)
        if bucket.graph is not None:
            bucket.graph.replay()
            assert bucket.logits is not None
            logits = bucket.logits
        else:
            logits = self._forward_static(bucket)
        self.replays += 1
        return logits[:n]
