"""Paged KV-cache block allocation with reference counts and prefix caching of full blocks.

Theory of operation. The cache is ``num_blocks`` blocks of ``block_size`` token slots. A
sequence owns a block table (list of block ids). When a block fills with tokens whose K/V have
been computed, it gets a hash chained from its predecessor's (so equal hashes mean equal whole
prefixes) and is indexed by it. A new sequence first walks its prompt's full blocks through the
index and shares every block it finds (reference count + 1): those tokens need no compute.
Freed blocks with a hash stay indexed until reused (least recently freed first), so a later
request with the same prefix can still hit them. Pure Python; no tensors.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(parent + struct.pack(f"<{len(token_ids)}q", *token_ids), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU order
        self._index: dict[bytes, int] = {}
        self.prefix_hits = 0  # blocks reused from the prefix cache
        self.prefix_queries = 0  # full prompt blocks looked up

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """Share cached blocks for the longest cached prefix of full blocks (at least one token is
        left uncomputed, so the sequence still gets logits). Returns (blocks, their hashes)."""
        if not self.enable_prefix_caching:
            return [], []
        blocks: list[int] = []
        hashes: list[bytes] = []
        parent = b""
        max_full = (len(token_ids) - 1) // self.block_size
        for i in range(max_full):
            h = block_hash(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            self.prefix_queries += 1
            block = self._index.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
            parent = h
        for block in blocks:
            self._take(block)
        self.prefix_hits += len(blocks)
        return blocks, hashes

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"need {count} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(count):
            block = next(iter(self._free))
            old = self.hashes[block]
            if old is not None and self._index.get(old) == block:
                del self._index[old]  # evict the cached prefix it held
            self.hashes[block] = None
            self._take(block)
            out.append(block)
        return out

    def seal(self, block: int, parent: bytes, token_ids: list[int]) -> bytes:
        """A block is full and computed: index it for prefix sharing; returns its hash."""
        h = block_hash(parent, token_ids)
        if self.enable_prefix_caching and self.hashes[block] is None:
            self.hashes[block] = h
            self._index.setdefault(h, block)
        return h

    def free(self, blocks: list[int]) -> None:
        for block in reversed(blocks):  # tail blocks become the first to be evicted
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, "block freed twice"
            if self.ref_counts[block] == 0:
                self._free[block] = None
                self._free.move_to_end(block)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._free.pop(block, None)
        self.ref_counts[block] += 1
