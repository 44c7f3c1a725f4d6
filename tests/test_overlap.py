"""Overlap with one pipeline stage: a step whose sequences decode (and which requests may join)
is scheduled and launched before the tokens of the step before reach the host. Whatever the
workload, the tokens must be those of the synchronous path."""

from __future__ import annotations

import json
import time

import pytest
from conftest import PROMPTS, cli, json_lines

from dist_runtime import LLM, SamplingParams

MIXED = PROMPTS + ["Once upon a time there was a small engine that wanted to run a large language model. " * 2,
                   "def generate(prompt, max_tokens=16):"]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(engines):
    return str(engines("llama", 1, 1, max_seq_len=256, max_num_tokens=32))  # long prompts prefill in chunks


@pytest.fixture(scope="module")
def on(engine):
    with LLM(engine) as llm:
        assert llm.coordinator.overlap
        yield llm


@pytest.fixture(scope="module")
def off(engine):
    with LLM(engine, overlap=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def greedy(off):
    return [o.token_ids for o in off.generate(MIXED, GREEDY)]


def _outputs(llm: LLM, params) -> list[tuple]:
    llm.coordinator.timings.clear()
    return [(c.token_ids, c.text, c.finish_reason, c.logprobs) for o in llm.generate(MIXED, params) for c in o.outputs]


def _steps_ahead(llm: LLM) -> int:
    return sum(t.launched_ahead for t in llm.coordinator.timings)


def _stop_tokens(greedy: list[list[int]]) -> list[SamplingParams]:
    """Each prompt stops at a token of its own greedy output, at a different step for each."""
    return [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[tokens[2 + i]])
            for i, tokens in enumerate(greedy)]


def test_sequences_ending_at_different_steps_get_the_synchronous_tokens(on, off):
    params = [SamplingParams(max_tokens=1 + 4 * i, temperature=0.0, ignore_eos=True) for i in range(len(MIXED))]
    assert _outputs(on, params) == _outputs(off, params)
    assert _steps_ahead(on) > 0 and _steps_ahead(off) == 0


def test_sequences_stopping_while_others_wait_leave_the_next_step_launched_ahead(on, off):
    """Short requests stop at their length limits, at different steps, while others still wait
    for the step's token budget: those join a step launched ahead of the stopping ones' last
    tokens (the blocks are plenty), so every step but the first is launched ahead; the tokens
    are the synchronous ones."""
    prompts = [MIXED[-1]] + [f"Request {i}: count to ten." for i in range(12)]
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)] + [
        SamplingParams(max_tokens=2 + i, temperature=0.0, ignore_eos=True) for i in range(12)]
    on.coordinator.timings.clear()
    got = [o.outputs[0].token_ids for o in on.generate(prompts, params)]
    timings = list(on.coordinator.timings)
    assert got == [o.outputs[0].token_ids for o in off.generate(prompts, params)]
    assert [t.launched_ahead for t in timings] == [False] + [True] * (len(timings) - 1)


def test_a_stop_token_seen_one_step_late_ends_the_sequence_where_it_ends_without_overlap(on, off, greedy):
    params = _stop_tokens(greedy)
    got = _outputs(on, params)
    assert got == _outputs(off, params)
    assert [reason for _, _, reason, _ in got] == ["stop"] * len(MIXED)
    assert _steps_ahead(on) > 0


def test_stop_strings_cut_the_text_as_without_overlap(on, off, greedy):
    texts = [o.text for o in off.generate(MIXED, GREEDY)]
    stops = [next(text[i:i + 2] for i in range(2 + n, len(text) - 2) if "\ufffd" not in text[i:i + 2])
             for n, text in enumerate(texts)]
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[s]) for s in stops]
    got = _outputs(on, params)
    assert got == _outputs(off, params)
    assert [reason for _, _, reason, _ in got] == ["stop"] * len(MIXED)


def test_seeded_sampling_n_completions_and_logprobs_get_the_synchronous_tokens(on, off):
    params = [SamplingParams(max_tokens=12 + i, temperature=0.8, top_p=0.9, top_k=40, seed=i, n=1 + i % 2,
                             logprobs=2 if i % 3 == 0 else None, ignore_eos=True) for i in range(len(MIXED))]
    assert _outputs(on, params) == _outputs(off, params)
    assert _steps_ahead(on) > 0


def test_penalties_and_logits_wait_for_the_tokens_and_keep_them(on, off):
    """Penalties read the previous tokens and a graph would overwrite the logits: no step goes
    ahead of them. (A request left waiting may join ahead of the last tokens of sequences that
    stop at their length: it has no token in flight; so the count is of requests in one batch.)"""
    params = SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5,
                            ignore_eos=True)
    assert _outputs(on, params) == _outputs(off, params)
    on.coordinator.timings.clear()
    on.generate(MIXED[:4], params)
    assert _steps_ahead(on) == 0
    on.coordinator.timings.clear()
    with_logits = [llm.generate(MIXED, GREEDY, return_logits=True) for llm in (on, off)]
    for a, b in zip(*with_logits):
        assert a.token_ids == b.token_ids and a.outputs[0].logits.equal(b.outputs[0].logits)
    assert _steps_ahead(on) == 0


def test_requests_joining_a_decoding_batch_get_the_synchronous_tokens(on, greedy):
    handles = []
    for prompt in MIXED:
        handles.append(on.submit(prompt, GREEDY))
        deadline = time.time() + 30
        while not (handles[-1].seqs and handles[-1].seqs[0].num_output >= 2) and time.time() < deadline:
            time.sleep(0.001)  # the next request joins a batch already decoding
    assert [h.result(timeout=60).token_ids for h in handles] == greedy


def test_sequences_ending_late_in_a_tiny_kv_pool_leak_and_corrupt_no_block(engine, off, greedy):
    """Blocks of a sequence whose stop token is seen one step late go back at once, to be
    reused (and preempted for) by the others; after the last request every block is free."""
    params = _stop_tokens(greedy) + [GREEDY] * len(MIXED)
    expected = [o.token_ids for o in off.generate(MIXED * 2, params)]
    with LLM(engine, num_kv_blocks=8) as small:
        assert [o.token_ids for o in small.generate(MIXED * 2, params)] == expected
        c = small.coordinator
        deadline = time.time() + 10
        while c.has_work() and time.time() < deadline:
            time.sleep(0.01)
        assert not c.has_work() and c.scheduler.num_preemptions > 0 and _steps_ahead(small) > 0
        assert c.blocks.num_free == c.blocks.num_blocks and not any(c.blocks.ref_count)


@pytest.mark.slow
def test_cli_no_overlap_gives_the_same_tokens_and_bench_reports_it(engine):
    args = ["generate", engine, "--temperature", "0", "--max-tokens", "8", "--json",
            *[a for p in PROMPTS for a in ("--prompt", p)]]
    assert json_lines(cli(*args)) == json_lines(cli(*args, "--no-overlap"))
    reports = []
    for extra in ([], ["--no-overlap"]):
        proc = cli("bench", engine, "--isl", "8", "--osl", "6", "--num-requests", "4", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout))
    assert reports[0]["overlap"] and reports[0]["steps_launched_ahead"] > 0
    assert not reports[1]["overlap"] and reports[1]["steps_launched_ahead"] == 0


@pytest.mark.slow
def test_tp2_ranks_launch_greedy_decodes_ahead_and_wait_for_sampled_ids(engines):
    """Every rank of a TP group holds the same gathered logits, so after a greedy step each
    takes their argmax as the next inputs and rank 0 goes ahead; after a sampling step only
    rank 0 has the ids, and the next step waits for them. Tokens as with overlap off."""
    tp2 = str(engines("llama", 2, 1, max_seq_len=256, max_num_tokens=32))
    sampled = [SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=i, ignore_eos=True)
               for i in range(len(MIXED))]
    with LLM(tp2) as llm:
        c = llm.coordinator
        assert c.overlap
        ahead = [(_outputs(llm, params), _steps_ahead(llm)) for params in (GREEDY, sampled)]
        c.overlap = False
        assert [o for o, _ in ahead] == [_outputs(llm, params) for params in (GREEDY, sampled)]
    assert ahead[0][1] > 0 and ahead[1][1] == 0


def test_logits_asked_for_by_one_generate_are_not_kept_for_later_requests(on):
    """Logits are the asking call's: requests submitted after it get none, and their steps
    launch ahead again (a step whose logits are wanted keeps the next one waiting)."""
    assert all(o.outputs[0].logits is not None for o in on.generate(PROMPTS[:2], GREEDY, return_logits=True))
    on.coordinator.timings.clear()
    later = [on.submit(prompt, GREEDY) for prompt in PROMPTS[:2]]
    assert all(h.result().outputs[0].logits is None for h in later)
    assert _steps_ahead(on) > 0


def test_a_prompt_in_chunks_has_each_next_chunk_launched_ahead(on, off):
    """A prompt longer than a step's 32 tokens prefills over several steps. The host has its
    tokens, so each chunk after the first is launched while the one before runs, as are the
    decodes after it; the tokens are the synchronous ones."""
    prompt = "Chunked: " + MIXED[-2] * 3  # no cached prefix from other tests
    on.coordinator.timings.clear()
    got = on.generate([prompt], GREEDY)[0].outputs[0].token_ids
    timings = list(on.coordinator.timings)
    assert got == off.generate([prompt], GREEDY)[0].outputs[0].token_ids
    chunks = -(-len(on.tokenizer.encode(prompt)) // 32)
    assert chunks >= 3 and len(timings) == chunks + GREEDY.max_tokens - 1
    assert [t.launched_ahead for t in timings[:chunks + 1]] == [False] + [True] * chunks


def test_requests_join_a_step_launched_ahead_of_the_tokens_before(on, off):
    """Prompts arriving while a sequence decodes join the next step, which is launched before
    the previous step's tokens reach the host; the tokens are the synchronous ones."""
    # The first sequence decodes long enough that the others arrive while it runs, even when
    # this thread is descheduled for a while on a busy machine (with 30, one CI run saw no step join).
    long = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    first = on.submit(MIXED[-1], long)
    deadline = time.time() + 30
    while not (first.seqs and first.seqs[0].num_output >= 2) and time.time() < deadline:
        time.sleep(0.001)
    on.coordinator.timings.clear()
    joining = [on.submit(prompt, GREEDY) for prompt in PROMPTS[:3]]
    got = [h.result(timeout=60).token_ids for h in [first, *joining]]
    timings = list(on.coordinator.timings)
    expected = [o.token_ids for o in off.generate([MIXED[-1], *PROMPTS[:3]], [long, *[GREEDY] * 3])]
    assert got == expected
    # One sequence ran when the timings were cleared; the joiners may already ride the first step after
    running_before = [1, *(t.running for t in timings)]
    assert any(t.launched_ahead and t.running > before for before, t in zip(running_before, timings))
