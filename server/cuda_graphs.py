"""All-decode steps through static, padded buffers, replayed from CUDA graphs once captured.

A decode step of a small model is bound by kernel launches, not by the GPU: each layer is a
dozen launches of a few microseconds each. A CUDA graph records the whole forward pass once
and replays it with one launch. Graphs replay fixed shapes and fixed addresses, so each batch
size bucket (``bucket_sizes``) owns static inputs: token ids, positions, KV slots, and an
attention plan from the backend (``TritonAttention.static_decode``: context lengths and a block
table as wide as the longest context). A step copies its values into the bucket's inputs, pads
the unused rows (token 0 at position 0, context 1, K/V written to the cache's spare pad block),
runs, and reads the first rows of the logits. Context lengths are read by the kernels from the
device, so one graph serves every length.

Every all-decode step of the Triton backend runs here, captured or not (``capture=False``, or
off the GPU): the same padded rows, the same plan (split-KV by the bucket's size class), the
same kernels with the same arguments. Turning graphs off therefore changes launch overhead,
never the floats, and a request's tokens do not depend on it. Anything else (a prefill chunk in
the batch) runs through the engine's general path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .attention import AttentionBackend, AttentionMetadata, TritonAttention
from .model import LlamaModel

log = logging.getLogger(__name__)

WARMUP_CONTEXT = 2048  # keys per row while warming up, so the autotuner times realistic reads


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, then every multiple of 16, capped at ``max_num_seqs``. No interval
    (previous bucket, bucket] holds a power of two below its top, so a batch and the bucket it is
    padded to share the next power of two, which is all the decode split depends on."""
    sizes = [1]
    while sizes[-1] < max_num_seqs:
        sizes.append(min(sizes[-1] * 2 if sizes[-1] < 32 else sizes[-1] + 16, max_num_seqs))
    return sizes


@dataclass
class _Bucket:
    size: int
    longs: torch.Tensor  # int64 [3, size]: token ids, positions, KV slots
    meta: AttentionMetadata  # its plan: static context lengths and block tables
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_caches: list[torch.Tensor], backend: AttentionBackend,
                 block_size: int, max_model_len: int, max_num_seqs: int, pad_block: int, capture: bool = True,
                 kv_scales: list[torch.Tensor] | None = None):
        if not isinstance(backend, TritonAttention):
            raise ValueError("decode graphs need the Triton backend")
        self.model, self.kv_caches, self.backend, self.kv_scales = model, kv_caches, backend, kv_scales
        self.block_size, self.pad_block, self.capture = block_size, pad_block, capture
        self.width = -(-max_model_len // block_size)  # blocks in the longest context
        cfg = model.cfg
        device = kv_caches[0].device
        self.buckets: dict[int, _Bucket] = {}
        for size in bucket_sizes(max_num_seqs):
            longs = torch.zeros(3, size, dtype=torch.long, device=device)
            meta = backend.static_decode(size, self.width, cfg.num_kv_heads, longs[2], block_size)
            self.buckets[size] = _Bucket(size, longs, meta)
        self._rows = {size: torch.arange(size, device=device) for size in self.buckets}  # logit rows
        self.replays = 0  # steps run here (replayed or launched)

    def bucket_for(self, num_rows: int) -> int | None:
        return next((s for s in self.buckets if s >= num_rows), None)

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

    def stop_capturing(self) -> None:
        """After a failed capture: launch every bucket eagerly (the same plan, so the same tokens)."""
        self.capture = False
        for bucket in self.buckets.values():
            bucket.graph, bucket.logits = None, None

    def _forward_static(self, bucket: _Bucket) -> torch.Tensor:
        out: torch.Tensor = self.model(bucket.longs[0], bucket.longs[1], self.kv_caches, bucket.meta, self.backend,
                                       self._rows[bucket.size], self.kv_scales)
        return out

    def _fill(self, bucket: _Bucket, tokens: list[int], positions: list[int], slots: list[int],
              context_lens: list[int], tables: list[list[int]]) -> None:
        """Copy one step's rows into the bucket's inputs, padding the rest. Only the used width of
        the block table is copied: the kernels never read past a row's context. Launched eagerly,
        the attention grid is sized for this step's longest context (a graph keeps its own)."""
        pad = bucket.size - len(tokens)
        pad_slot = self.pad_block * self.block_size
        longs = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [pad_slot] * pad], dtype=torch.long)
        used = max([len(t) for t in tables] + [1])
        rows = [t + [0] * (used - len(t)) for t in tables] + [[self.pad_block] + [0] * (used - 1)] * pad
        bucket.longs.copy_(longs, non_blocking=True)  # from pageable memory: staged at once, no device wait
        self.backend.write_static_decode(bucket.meta, torch.tensor(context_lens + [1] * pad, dtype=torch.int32),
                                         torch.tensor(rows, dtype=torch.int32),
                                         None if self.capture else max(context_lens + [1]))

    def run(self, tokens: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            tables: list[list[int]]) -> torch.Tensor | None:
        """Logits [n, vocab] of one all-decode step, or None when no bucket fits (run it eagerly)."""
        n = len(tokens)
        size = self.bucket_for(n)
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
