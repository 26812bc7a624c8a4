import pytest

from server.batcher import Batcher
from server.block_manager import BlockManager
from server.sampling import SamplingParams
from server.sequence import SeqStatus, Sequence


def test_shared_prefix_blocks_are_found_and_reference_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))  # two full blocks + 2 tokens
    first = bm.allocate(3)
    h0 = bm.seal(first[0], b"", tokens[0:4])
    bm.seal(first[1], h0, tokens[4:8])
    blocks, hashes = bm.match_prefix(tokens)
    assert blocks == first[:2] and len(hashes) == 2 and bm.prefix_hits == 2
    assert bm.ref_counts[first[0]] == 2
    bm.free(first)
    bm.free(blocks)
    assert bm.num_free == 8
    again, _ = bm.match_prefix(tokens + [99])  # freed blocks stay cached until reused
    assert again == first[:2]


def test_a_whole_cached_prompt_still_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=4, block_size=4)
    tokens = list(range(8))
    blocks = bm.allocate(2)
    h0 = bm.seal(blocks[0], b"", tokens[:4])
    bm.seal(blocks[1], h0, tokens[4:])
    matched, _ = bm.match_prefix(tokens)
    assert len(matched) == 1


def test_reuse_evicts_the_cached_hash():
    bm = BlockManager(num_blocks=1, block_size=2)
    (block,) = bm.allocate(1)
    bm.seal(block, b"", [1, 2])
    bm.free([block])
    assert bm.allocate(1) == [block]
    bm.free([block])
    assert bm.match_prefix([1, 2, 3]) == ([], [])


def test_allocation_beyond_capacity_raises():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(MemoryError):
        bm.allocate(3)


def seq(i: int, prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence(f"s{i}", list(range(100 * i, 100 * i + prompt)), SamplingParams(max_tokens=max_tokens))


def test_chunked_prefill_respects_the_token_budget_and_running_go_first():
    batcher = Batcher(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=10)
    a, b = seq(1, 25), seq(2, 3)
    batcher.add(a)
    batcher.add(b)
    step1 = batcher.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in step1] == [("s1", 10)]
    a.num_computed += 10
    step2 = batcher.schedule()
    assert [(s.seq.request_id, s.num_tokens) for s in step2] == [("s1", 10)]
    a.num_computed += 10
    step3 = batcher.schedule()
    assert [(s.seq.request_id, s.num_tokens, s.is_last_chunk) for s in step3] == [("s1", 5, True), ("s2", 3, True)]


def test_out_of_blocks_preempts_the_newest_running_sequence():
    batcher = Batcher(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=100)
    a, b = seq(1, 7), seq(2, 7)
    batcher.add(a)
    batcher.add(b)
    assert len(batcher.schedule()) == 2  # 2 blocks each: the cache is full
    a.num_computed, b.num_computed = 7, 7
    a.output_ids.append(1)
    b.output_ids.append(2)
    a.output_ids.append(3)  # a needs a third block now
    batch = batcher.schedule()
    assert [s.seq.request_id for s in batch] == ["s1"]
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.block_table == []
    assert batcher.waiting[0] is b and batcher.num_preemptions == 1
