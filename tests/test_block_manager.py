"""Property tests of the KV-cache block manager, without torch or ranks."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dist_runtime.block_manager import BlockManager
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.sequence import Sequence

BS = 4
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9], []]


def _check(bm: BlockManager, holders: list[Sequence]) -> None:
    """Reference counts equal the number of block tables holding each block; held blocks are
    never evictable; no count is negative; a sequence never holds a block twice."""
    counts = [0] * bm.num_blocks
    for seq in holders:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for b in seq.block_table:
            counts[b] += 1
    assert counts == bm.ref_count
    assert all(c >= 0 for c in bm.ref_count)
    for b in range(bm.num_blocks):
        assert (b in bm.evictable) == (bm.ref_count[b] == 0)


ops = st.lists(st.tuples(st.sampled_from(["add", "run", "free"]), st.integers(0, 2), st.integers(1, 12)),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
@example([("add", 0, 1), ("add", 0, 1), ("add", 0, 4), ("add", 0, 1), *[("run", 2, 1)] * 5])  # a full cache
def test_blocks_are_never_double_owned_and_all_return(operations):
    bm = BlockManager(12, BS)
    held: list[Sequence] = []
    for i, (op, which, size) in enumerate(operations):
        if op == "add":
            seq = Sequence(i, PREFIXES[which] + list(range(100 + i, 100 + i + size)), SamplingParams(), 0)
            bm.take_cached_prefix(seq)
            if bm.can_grow(seq, len(seq)):
                bm.grow(seq, len(seq))
                held.append(seq)
            else:
                bm.free(seq)
        elif op == "run" and held:
            seq = held[which % len(held)]
            seq.num_cached = len(seq)  # its step ran: every token is in the cache
            bm.register_full_blocks(seq)
            seq.tokens.append(7)
            if bm.can_grow(seq, len(seq)):
                bm.grow(seq, len(seq))
            else:  # the scheduler preempts it: no sequence runs with a token that has no block
                held.remove(seq)
                bm.free(seq)
        elif op == "free" and held:
            bm.free(held.pop(which % len(held)))
        _check(bm, held)
    for seq in held:
        bm.free(seq)
    _check(bm, [])
    assert bm.num_free == bm.num_blocks


def test_shared_prefix_blocks_are_reused_and_skip_prefill():
    bm = BlockManager(16, BS)
    first = Sequence(0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], SamplingParams(), 0)
    assert bm.take_cached_prefix(first) == 0
    bm.grow(first, len(first))
    first.num_cached = len(first)
    bm.register_full_blocks(first)
    second = Sequence(1, [1, 2, 3, 4, 5, 6, 7, 8, 42], SamplingParams(), 0)
    assert bm.take_cached_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert bm.ref_count[first.block_table[0]] == 2
    fully_cached = Sequence(2, [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(), 0)  # its last token must still run
    assert bm.take_cached_prefix(fully_cached) == 4


def test_evicted_blocks_are_least_recently_used_first():
    bm = BlockManager(4, BS)
    a = Sequence(0, [1, 1, 1, 1, 2, 2, 2, 2], SamplingParams(), 0)
    bm.grow(a, 8)
    a.num_cached = 8
    bm.register_full_blocks(a)
    bm.free(a)  # both blocks cached, evictable; the tail block first
    b = Sequence(1, [5] * 12, SamplingParams(), 0)
    bm.grow(b, 12)  # needs 3 of 4 blocks: the 2 never used, then a's tail
    c = Sequence(2, [1, 1, 1, 1, 2, 2, 2, 2, 3], SamplingParams(), 0)
    assert bm.take_cached_prefix(c) == 4  # a's first block survived
