"""Continuous batching with chunked prefill and preemption by recompute.

Each step ``schedule()`` picks (sequence, number of tokens to compute) pairs within
``max_num_batched_tokens`` and ``max_num_seqs``: running sequences first, in admission order
(a decode needs one token, an unfinished prefill its next chunk), then waiting sequences,
whose prompt may be split into chunks across steps. When the KV cache has no block for a
running sequence, the most recently admitted one is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed from its prompt and the tokens it already
generated. Pure Python over the block manager; no tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SeqStatus


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # to compute this step, starting at seq.num_computed

    @property
    def is_last_chunk(self) -> bool:
        """After this step every token has K/V: the sequence samples its next token."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Batcher:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Finished or aborted: free its blocks and forget it."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        batch: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, n):
                preempted = True
                while not self._grow(seq, n):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    continue  # seq itself was preempted; running[i] is now the next one
            batch.append(Scheduled(seq, n))
            budget -= n
            i += 1
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                blocks, hashes = self.blocks.match_prefix(seq.tokens(0, seq.num_tokens))
                seq.block_table, seq.block_hashes = blocks, hashes
                seq.num_computed = len(blocks) * self.blocks.block_size
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, n):
                self._release(seq)  # don't hold shared prefix blocks while waiting
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(Scheduled(seq, n))
            budget -= n
        return batch

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Allocate blocks for ``n`` more tokens; False if the cache is out of blocks."""
        need = self.blocks.blocks_needed(seq.num_computed + n) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        seq.block_table += self.blocks.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0
