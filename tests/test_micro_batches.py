"""Micro-batches across pipeline stages: with pp > 1, rank 0 keeps one step in flight per stage,
each over other sequences. Whatever the workload, the tokens must be those of micro-batching
off, and those of one rank in float32."""

from __future__ import annotations

import json
import time

import pytest
from conftest import PROMPTS, cli

from dist_runtime import LLM, SamplingParams
from dist_runtime.presets import preset_config
from sharding.builder import build_engine
from sharding.synth import write_checkpoint

MIXED = PROMPTS + ["Once upon a time there was a small engine that wanted to run a large language model. " * 2,
                   "def generate(prompt, max_tokens=16):", "1, 2, 3, 4,", "Pipelines keep every stage busy"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PLAN = dict(max_seq_len=256, max_num_tokens=32)  # long prompts prefill in chunks


@pytest.fixture(scope="module")
def one_rank(engines):
    with LLM(str(engines("llama", 1, 1, **PLAN)), overlap=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def greedy(one_rank):
    return [o.token_ids for o in one_rank.generate(MIXED, GREEDY)]


def _outputs(llm: LLM, params) -> list[tuple]:
    llm.coordinator.timings.clear()
    return [(c.token_ids, c.finish_reason, c.logprobs) for o in llm.generate(MIXED, params) for c in o.outputs]


def _workloads(greedy: list[list[int]]) -> list:
    """Sequences ending at different steps; stop tokens, each met at another step; seeded
    sampling with n completions and logprobs."""
    lengths = [SamplingParams(max_tokens=1 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(MIXED))]
    stops = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop_token_ids=[tokens[2 + i]])
             for i, tokens in enumerate(greedy)]
    sampled = [SamplingParams(max_tokens=10 + i, temperature=0.8, top_p=0.9, top_k=40, seed=i, n=1 + i % 2,
                              logprobs=2 if i % 3 == 0 else None, ignore_eos=True) for i in range(len(MIXED))]
    return [lengths, stops, sampled]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_pp2_micro_batches_give_the_tokens_of_micro_batching_off_and_of_one_rank(engines, one_rank, greedy, tp):
    engine = str(engines("llama", tp, 2, **PLAN))
    expected = [_outputs(one_rank, params) for params in _workloads(greedy)]
    for overlap in (True, False):
        with LLM(engine, overlap=overlap) as llm:
            assert llm.coordinator.micro_batches == (2 if overlap else 1)
            for params, want in zip(_workloads(greedy), expected):
                got = _outputs(llm, params)
                assert [(t, r) for t, r, _ in got] == [(t, r) for t, r, _ in want]
                assert [lp and [(x.token_id, x.top[0][0]) for x in lp] for _, _, lp in got] == \
                       [lp and [(x.token_id, x.top[0][0]) for x in lp] for _, _, lp in want]
                assert (sum(t.launched_ahead for t in llm.coordinator.timings) > 0) == overlap
        assert [r for _, r, _ in expected[1]] == ["stop"] * len(MIXED)


@pytest.fixture(scope="module")
def pp2(engines):
    with LLM(str(engines("llama", 1, 2, **PLAN))) as llm:
        yield llm


def test_requests_joining_while_others_decode_get_the_tokens_of_one_rank(pp2, greedy):
    handles = []
    for prompt in MIXED:
        handles.append(pp2.submit(prompt, GREEDY))
        deadline = time.time() + 30
        while not (handles[-1].seqs and handles[-1].seqs[0].num_output >= 2) and time.time() < deadline:
            time.sleep(0.001)  # the next request joins while this one decodes
    assert [h.result(timeout=60).token_ids for h in handles] == greedy


def test_a_tiny_kv_pool_preempts_only_sequences_not_in_flight_and_leaks_no_block(engines, greedy):
    with LLM(str(engines("llama", 1, 2, **PLAN)), num_kv_blocks=8) as small:
        assert [o.token_ids for o in small.generate(MIXED, GREEDY)] == greedy
        c = small.coordinator
        assert c.scheduler.num_preemptions > 0 and sum(t.launched_ahead for t in c.timings) > 0
        assert not c.has_work() and c.blocks.num_free == c.blocks.num_blocks and not any(c.blocks.ref_count)


@pytest.fixture(scope="module")
def wide_pp2(tmp_path_factory):
    """Stages with enough work per step for a bubble to show: the tiny model's steps are mostly overhead."""
    root = tmp_path_factory.mktemp("wide")
    config = preset_config("tiny", "llama") | {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8,
                                               "num_attention_heads": 6, "head_dim": 64, "vocab_size": 2048}
    ckpt = write_checkpoint(config, root / "ckpt", progress=False)
    build_engine(ckpt, root / "eng", 1, 2, "fp32", progress=False, max_batch_size=4, max_seq_len=128)
    return str(root / "eng")


@pytest.mark.slow
def test_bench_reports_a_smaller_bubble_with_micro_batches_on(wide_pp2):
    reports = []
    for extra in ([], ["--no-overlap"]):
        proc = cli("bench", wide_pp2, "--isl", "16", "--osl", "32", "--num-requests", "8", "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout))
    on, off = reports
    print(f"\npp=2 on CPU: micro-batches on {on['output_tokens_per_s']:.1f} tok/s, bubble {on['bubble_fraction']:.3f}"
          f" {on['idle_fraction']}; off {off['output_tokens_per_s']:.1f} tok/s, bubble {off['bubble_fraction']:.3f}"
          f" {off['idle_fraction']}")
    assert on["micro_batches"] == 2 and off["micro_batches"] == 1
    for report in reports:
        assert 0 <= report["bubble_fraction"] <= 1 and set(report["idle_fraction"]) == {"rank0", "rank1"}
    assert on["bubble_fraction"] < off["bubble_fraction"]
