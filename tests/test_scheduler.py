"""Property tests of the scheduler, without torch or ranks: a fake model whose next token is
the sequence's output count (so it survives recompute) runs every step it schedules, and steps
land (their tokens applied) as the coordinator applies them: at once, one step late (overlap,
with placeholders), or when they leave a pipeline (micro-batches)."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from dist_runtime.block_manager import BlockManager
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.scheduler import Chunk, Scheduler
from dist_runtime.sequence import Sequence

BS = 4


def _scheduler(num_blocks: int, max_num_tokens: int, max_batch_size: int = 4, prefix_caching: bool = True,
               no_evict: bool = False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix_caching), max_batch_size, max_num_tokens, num_blocks * BS,
                     no_evict)


def _land(sched: Scheduler, chunks: list[Chunk]) -> None:
    """Apply a step's results as the coordinator does: its tokens are in the cache, each
    sampled token takes its placeholder's place, and a sequence at its limit finishes."""
    for c in chunks:
        if not c.seq.is_finished:
            c.seq.num_in_flight -= c.num_tokens
            c.seq.num_cached += c.num_tokens
            sched.blocks.register_full_blocks(c.seq)
    for c in chunks:
        if c.samples and not c.seq.is_finished:
            c.seq.tokens.append(c.seq.num_output)
            c.seq.num_placeholders -= 1
            if sched.reaches_length_limit(c.seq, len(c.seq)):
                sched.finish(c.seq, "length")


def _check_blocks(sched: Scheduler) -> None:
    """Every running sequence holds blocks for all its tokens in flight; no block is held twice
    by one sequence, and reference counts match the holders."""
    counts = [0] * sched.blocks.num_blocks
    for seq in sched.running:
        assert len(seq.block_table) * BS >= seq.num_cached + seq.num_in_flight
        assert len(set(seq.block_table)) == len(seq.block_table)
        for b in seq.block_table:
            counts[b] += 1
    assert counts == sched.blocks.ref_count


def _run(sched: Scheduler, seqs: list[Sequence], kept_in_flight: int, placeholders: bool) -> list[list[tuple]]:
    """Run the coordinator's loop to the end; returns each step's (sequence, start, end, samples)."""
    for seq in seqs:
        sched.add(seq)
    steps, in_flight = [], deque()
    while sched.has_work() or in_flight:
        assert len(steps) < 3000
        tables = {c.seq: list(c.seq.block_table) for step in in_flight for c in step}
        chunks = sched.schedule(placeholders)
        while not chunks and in_flight:  # nothing can run before the oldest step lands
            _land(sched, in_flight.popleft())
            tables = {c.seq: list(c.seq.block_table) for step in in_flight for c in step}
            chunks = sched.schedule(placeholders)
        if not chunks:
            break
        if not placeholders:  # a sequence in flight runs in no other step and keeps its blocks
            assert not {c.seq for c in chunks} & set(tables)
            assert all(seq in sched.running and seq.block_table == table for seq, table in tables.items())
        assert sum(c.num_tokens for c in chunks) <= sched.max_num_tokens
        assert len({c.seq for c in chunks}) == len(chunks) <= sched.max_batch_size
        _check_blocks(sched)
        steps.append([(c.seq.seq_id, c.start, c.end, c.samples) for c in chunks])
        in_flight.append(chunks)
        while len(in_flight) > kept_in_flight:
            _land(sched, in_flight.popleft())
    return steps


def _requests(prompt_lens: list[int], num_blocks: int, max_tokens: list[int]) -> list[Sequence]:
    return [Sequence(i, [i + 1] + list(range(min(n, num_blocks * BS - 8) - 1)), SamplingParams(max_tokens=m), 0)
            for i, (n, m) in enumerate(zip(prompt_lens, max_tokens))]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(8, 24), st.integers(4, 32))
def test_every_request_gets_all_its_tokens_under_any_pool(prompt_lens, num_blocks, budget):
    """Whatever preemption the pool size forces, and every block comes back."""
    sched = _scheduler(num_blocks, max(budget, 4))
    seqs = _requests(prompt_lens, num_blocks, [5] * len(prompt_lens))
    _run(sched, seqs, kept_in_flight=0, placeholders=False)
    assert all(s.output_ids == [0, 1, 2, 3, 4] for s in seqs)
    assert sched.blocks.num_free == num_blocks


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 8)), min_size=1, max_size=12), st.integers(6, 24),
       st.integers(4, 32), st.integers(1, 4))
def test_steps_scheduled_on_placeholders_are_the_steps_scheduled_once_tokens_land(requests, num_blocks, budget,
                                                                                 batch):
    """With overlap, each step is scheduled while the one before runs, its sampled tokens
    placeholders: the steps (and so the tokens) are those of landing every step first, at any
    pool size, batch size and budget, through chunked prefill, preemption and sequences that
    stop at their length limits while others wait."""
    runs = []
    for placeholders in (False, True):
        sched = _scheduler(num_blocks, max(budget, batch), batch, prefix_caching=False)
        seqs = _requests([n for n, _ in requests], num_blocks, [m for _, m in requests])
        runs.append(_run(sched, seqs, kept_in_flight=int(placeholders), placeholders=placeholders))
        assert all(s.output_ids == list(range(m)) for s, (_, m) in zip(seqs, requests))
        assert sched.blocks.num_free == num_blocks
    assert runs[1] == runs[0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.integers(8, 24), st.integers(1, 3))
def test_micro_batches_in_flight_are_never_scheduled_or_preempted_and_every_request_finishes(
        prompt_lens, num_blocks, depth):
    """Up to `depth` steps stay in flight, each landing only when it leaves the pipeline (as PP
    micro-batches do): a sequence in flight keeps its blocks and runs in no other step."""
    sched = _scheduler(num_blocks, 16)
    seqs = _requests(prompt_lens, num_blocks, [5] * len(prompt_lens))
    _run(sched, seqs, kept_in_flight=depth, placeholders=False)
    assert all(s.output_ids == [0, 1, 2, 3, 4] for s in seqs)
    assert sched.blocks.num_free == num_blocks


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 8)), min_size=1, max_size=12), st.integers(8, 24),
       st.integers(4, 32), st.booleans())
def test_no_evict_never_preempts_and_every_request_gets_its_tokens(requests, num_blocks, budget, overlap):
    """GUARANTEED_NO_EVICT: a sequence joins only where it fits to its end beside what the
    running ones may still take, so no pool, budget or overlap ever forces a preemption."""
    sched = _scheduler(num_blocks, max(budget, 4), no_evict=True)
    seqs = _requests([n for n, _ in requests], num_blocks, [m for _, m in requests])
    _run(sched, seqs, kept_in_flight=int(overlap), placeholders=overlap)
    assert all(s.output_ids == list(range(m)) for s, (_, m) in zip(seqs, requests))
    assert sched.num_preemptions == 0
    assert sched.blocks.num_free == num_blocks


def test_no_evict_holds_back_what_max_utilization_admits_and_later_preempts():
    """Two sequences that each grow to 4 blocks, in a cache of 6: filling the cache takes both
    in and preempts one; never evicting runs them one after the other."""
    counts = {}
    for no_evict in (False, True):
        sched = _scheduler(6, 32, no_evict=no_evict)
        seqs = [Sequence(i, [1 + i] + list(range(3)), SamplingParams(max_tokens=12), 0) for i in range(2)]
        first = _run(sched, seqs, kept_in_flight=0, placeholders=False)[0]
        counts[no_evict] = (len(first), sched.num_preemptions)
    assert counts == {False: (2, 1), True: (1, 0)}


def test_decodes_keep_running_while_a_long_prompt_prefills_in_chunks():
    sched = _scheduler(64, 8)
    decoding = Sequence(0, [1, 2], SamplingParams(), 0)
    sched.add(decoding)
    _land(sched, sched.schedule())
    sched.add(Sequence(1, list(range(50)), SamplingParams(), 0))
    chunks = []
    for _ in range(8):
        step = sched.schedule()
        assert step[0].seq is decoding and step[0].num_tokens == 1  # the decode is in every step, first
        chunks += [c.num_tokens for c in step[1:]]
        _land(sched, step)
    assert chunks[:7] == [7] * 7 and sum(chunks) == 50


def test_a_sequence_runs_again_on_its_placeholder_before_its_token_lands():
    """Its length counts the token in flight, whose KV slot the next step reserves; the token
    id is the runner's to fill (the chunk starts past the tokens the host has)."""
    sched = _scheduler(16, 32)
    seq = Sequence(0, [1, 2, 3, 4], SamplingParams(), 0)
    sched.add(seq)
    prefill = sched.schedule(placeholders=True)
    assert [(c.start, c.end, c.samples) for c in prefill] == [(0, 4, True)]
    assert (seq.num_placeholders, seq.num_in_flight, seq.num_unscheduled) == (1, 4, 1)
    decode = sched.schedule(placeholders=True)
    assert [(c.start, c.end, c.samples) for c in decode] == [(4, 5, True)] and decode[0].start == len(seq)
    assert len(seq.block_table) == 2  # a block for position 4, whose token is still a placeholder
    _land(sched, prefill)
    assert seq.tokens == [1, 2, 3, 4, 0] and (seq.num_placeholders, seq.num_cached, seq.num_in_flight) == (1, 4, 1)
    assert sched.schedule(placeholders=True)[0].start == 5  # the next decode, on the second placeholder


def test_the_next_chunk_of_a_prompt_in_flight_starts_where_that_chunk_ends():
    """One chunking rule for every step: decodes first, then what the budget leaves of each
    prompt, counted from the tokens already taken by steps in flight."""
    sched = _scheduler(64, 8)
    decoding = Sequence(0, [1, 2], SamplingParams(), 0)
    sched.add(decoding)
    first = sched.schedule(placeholders=True)
    sched.add(Sequence(1, list(range(100, 120)), SamplingParams(), 0))
    second = sched.schedule(placeholders=True)
    third = sched.schedule(placeholders=True)
    assert [(c.seq.seq_id, c.start, c.end) for c in first] == [(0, 0, 2)]
    assert [(c.seq.seq_id, c.start, c.end) for c in second] == [(0, 2, 3), (1, 0, 7)]
    assert [(c.seq.seq_id, c.start, c.end) for c in third] == [(0, 3, 4), (1, 7, 14)]
    assert [c.samples for c in second + third] == [True, False, True, False]


def test_a_sequence_with_a_token_in_flight_is_never_preempted_the_step_waits_for_the_token():
    """When the blocks run short, the synchronous step would preempt, unless a sequence ending
    with the tokens in flight gives its blocks back: the step waits for them and nothing
    changes; once they land, the newest sequence is preempted."""
    sched = _scheduler(2, 8)  # 8 tokens of KV
    old, new = (Sequence(i, [1 + i, 2, 3], SamplingParams(max_tokens=4), 0) for i in range(2))
    sched.add(old)
    sched.add(new)
    prefill = sched.schedule(placeholders=True)
    tables = [list(old.block_table), list(new.block_table)]
    _land(sched, prefill)
    decode = sched.schedule(placeholders=True)  # position 3: still in the first block
    assert [c.start for c in decode] == [3, 3] and sched.blocks.num_free == 0
    assert sched.schedule(placeholders=True) is None  # position 4 needs blocks: none free
    assert [old.block_table, new.block_table] == tables and sched.num_preemptions == 0
    assert (old.num_placeholders, new.num_placeholders) == (1, 1)
    _land(sched, decode)
    step = sched.schedule(placeholders=True)
    assert [(c.seq, c.start, c.end) for c in step] == [(old, 4, 5)] and sched.num_preemptions == 1
    assert sched.waiting[0] is new and new.output_ids == [0, 1] and not new.block_table


def test_a_penalised_sequence_waits_for_its_token():
    """Penalties read every token the sequence has: none may be a placeholder."""
    sched = _scheduler(16, 32)
    sched.add(Sequence(0, [1, 2, 3], SamplingParams(repetition_penalty=1.2), 0))
    prefill = sched.schedule(placeholders=True)
    assert sched.schedule(placeholders=True) is None
    _land(sched, prefill)
    assert [c.start for c in sched.schedule(placeholders=True)] == [3]


def test_a_sequence_whose_token_in_flight_ends_it_gives_its_place_to_a_waiting_one():
    """It stops at its length limit once the token lands: it is not scheduled and does not
    count against the batch size, so a waiting sequence joins the step, where the free blocks
    cover the most the waiting could take; where they do not, the step waits for the token."""
    for num_blocks, joins in ((8, True), (3, False)):
        sched = _scheduler(num_blocks, 8, max_batch_size=1)
        ending = Sequence(0, [1, 2, 3], SamplingParams(max_tokens=1), 0)
        waiting = Sequence(1, [4, 5, 6, 7, 8], SamplingParams(), 0)
        sched.add(ending)
        sched.add(waiting)
        assert [c.seq for c in sched.schedule(placeholders=True)] == [ending]
        step = sched.schedule(placeholders=True)
        if joins:
            assert [(c.seq, c.start, c.end) for c in step] == [(waiting, 0, 5)]
        else:
            assert step is None and list(sched.waiting) == [waiting]
