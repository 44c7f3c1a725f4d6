"""Property tests of the KV-cache block manager and the scheduler, without torch or ranks."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dist_runtime.block_manager import BlockManager
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.scheduler import Scheduler
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
    whole = Sequence(2, [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(), 0)  # its last token must still run
    assert bm.take_cached_prefix(whole) == 4


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


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(8, 24), st.integers(4, 32))
def test_scheduler_finishes_every_request_under_any_pool(prompt_lens, num_blocks, budget):
    """A fake model (next token = step count) through the real scheduler: every request gets
    all its tokens, whatever preemption the pool size forces, and every block comes back."""
    max_len = num_blocks * BS
    bm = BlockManager(num_blocks, BS)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=max(budget, 4))
    want = {}
    for i, n in enumerate(prompt_lens):
        n = min(n, max_len - 6)
        seq = Sequence(i, list(range(n)), SamplingParams(max_tokens=5), 0)
        sched.add(seq)
        want[seq] = 5
    steps = 0
    while sched.has_work():
        steps += 1
        assert steps < 2000
        batch = sched.schedule()
        assert sum(n for _, n in batch) <= max(budget, 4)
        assert len({s for s, _ in batch}) == len(batch) <= 4
        for seq, n in batch:
            assert len(seq.block_table) * BS >= seq.num_cached + n
            seq.num_cached += n
            bm.register_full_blocks(seq)
            if seq.num_cached == len(seq):
                seq.tokens.append(seq.num_output)  # deterministic: survives recompute
                if seq.num_output == want[seq]:
                    sched.finish(seq, "length")
        _check(bm, sched.running)
    assert all(s.output_ids == [0, 1, 2, 3, 4] for s in want)
    assert bm.num_free == num_blocks


def test_decodes_keep_running_while_a_long_prompt_prefills_in_chunks():
    bm = BlockManager(64, BS)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=8)
    short = Sequence(0, [1, 2], SamplingParams(), 0)
    sched.add(short)
    (seq, n), = sched.schedule()
    short.num_cached = 2
    short.tokens.append(3)
    sched.add(Sequence(1, list(range(50)), SamplingParams(), 0))
    chunks = []
    for _ in range(8):
        batch = dict(sched.schedule())
        assert batch[short] == 1  # the decode is in every step
        for s, n in batch.items():
            s.num_cached += n
            if s is short:
                s.tokens.append(3)
            else:
                chunks.append(n)
    assert chunks[:7] == [7] * 7 and sum(chunks) == 50


def test_a_pool_too_small_for_all_preempts_and_still_finishes_all():
    bm = BlockManager(8, BS)  # 32 tokens of KV; three requests that grow to 24 tokens each
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=64)
    seqs = [Sequence(i, list(range(12)), SamplingParams(max_tokens=12), 0) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    while sched.has_work():
        for seq, n in sched.schedule():
            seq.num_cached += n
            if seq.num_cached == len(seq):
                seq.tokens.append(seq.num_output)
                if seq.num_output == 12:
                    sched.finish(seq, "length")
    assert sched.num_preemptions > 0
    assert all(s.output_ids == list(range(12)) for s in seqs)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(8, 24), st.integers(1, 3))
def test_micro_batches_in_flight_are_never_scheduled_or_preempted_and_every_request_finishes(
        prompt_lens, num_blocks, depth):
    """As the fake model above, with up to `depth` steps in flight, each applied only when it
    leaves the pipeline (as PP micro-batches are): a step never holds a sequence in flight."""
    max_len = num_blocks * BS
    bm = BlockManager(num_blocks, BS)
    sched = Scheduler(bm, max_batch_size=4, max_num_tokens=16)
    seqs = [Sequence(i, list(range(min(n, max_len - 6))), SamplingParams(max_tokens=5), 0)
            for i, n in enumerate(prompt_lens)]
    for seq in seqs:
        sched.add(seq)
    pipeline: list[list] = []
    for _ in range(4000):
        if not (sched.has_work() or pipeline):
            break
        in_flight = {s: list(s.block_table) for batch in pipeline for s, _ in batch}
        batch = sched.schedule(exclude=in_flight)
        assert not {s for s, _ in batch} & set(in_flight) and len(batch) <= 4
        assert all(s in sched.running and s.block_table == table for s, table in in_flight.items())
        if batch:
            pipeline.append(batch)
        if len(pipeline) > depth or (pipeline and not batch):
            for seq, n in pipeline.pop(0):
                seq.num_cached += n
                bm.register_full_blocks(seq)
                if seq.num_cached == len(seq):
                    seq.tokens.append(seq.num_output)
                    if seq.num_output == 5:
                        sched.finish(seq, "length")
    assert all(s.output_ids == [0, 1, 2, 3, 4] for s in seqs)
    assert bm.num_free == num_blocks
