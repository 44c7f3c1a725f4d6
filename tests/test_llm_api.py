"""The LLM API on real ranks (TP=2 x PP=2): in-flight batching, prefix caching, preemption,
stop conditions, n > 1, logprobs and streaming."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import PROMPTS, tool
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from dist_runtime import LLM, SamplingParams
from dist_runtime.detokenizer import IncrementalDetokenizer
from dist_runtime.tokenizer import Tokenizer as EngineTokenizer

MIXED = PROMPTS + ["Once upon a time there was a small engine that wanted to run a large language model. " * 2,
                   "def generate(prompt, max_tokens=16):", "Café, naïve, 日本語, 🙂"]
PARAMS = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True) if i % 2 else
          SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=i, ignore_eos=True)
          for i in range(len(MIXED))]


@pytest.fixture(scope="module")
def llm(engines):
    with LLM(str(engines("llama", 2, 2, max_seq_len=256, max_num_tokens=32))) as llm:
        yield llm


@pytest.fixture(scope="module")
def alone(llm):
    """Each request run with nothing else in the engine."""
    return [llm.generate([p], sp)[0].token_ids for p, sp in zip(MIXED, PARAMS)]


@pytest.mark.slow
def test_requests_arriving_at_different_times_equal_each_run_alone(llm, alone):
    handles = []
    for prompt, params in zip(MIXED, PARAMS):
        handles.append(llm.submit(prompt, params))
        deadline = time.time() + 30
        while not (handles[-1].seqs and handles[-1].seqs[0].num_output >= 2) and time.time() < deadline:
            time.sleep(0.001)  # the next request joins a batch already decoding
    assert [h.result().token_ids for h in handles] == alone


def test_a_batch_submitted_at_once_equals_each_run_alone(llm, alone):
    assert [o.token_ids for o in llm.generate(MIXED, PARAMS)] == alone


def test_prefix_cache_skips_the_shared_system_prompt_and_keeps_the_tokens(llm, engines):
    system = "You are a helpful assistant. Answer briefly and truthfully, in plain English. " * 2
    questions = [system + q for q in ("What is a block?", "Why page the cache?", "Who is rank 0?")]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    before = llm.stats()["prefix_cache_hit_tokens"]
    outs = [llm.generate([q], params)[0] for q in questions]
    assert outs[0].num_cached_tokens == 0 or outs[0].num_cached_tokens < 16
    assert all(o.num_cached_tokens >= 32 for o in outs[1:])  # the system prompt's full blocks
    assert llm.stats()["prefix_cache_hit_tokens"] - before >= 64
    with LLM(str(engines("llama", 2, 2, max_seq_len=256, max_num_tokens=32)), prefix_caching=False) as plain:
        assert [o.token_ids for o in plain.generate(questions, params)] == [o.token_ids for o in outs]


@pytest.mark.slow
def test_preemption_under_a_tiny_kv_pool_loses_nothing(engines, alone):
    with LLM(str(engines("llama", 2, 2, max_seq_len=256, max_num_tokens=32)), num_kv_blocks=8) as small:
        outs = small.generate(MIXED, PARAMS)
        assert small.stats()["preemptions"] > 0
    assert [o.token_ids for o in outs] == alone


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate(["Hello, world!"], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    text = base.text
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    cut = llm.generate(["Hello, world!"], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop],
                                                       ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]
    assert cut.token_ids == base.token_ids[: len(cut.token_ids)]
    by_id = llm.generate(["Hello, world!"], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                         stop_token_ids=[base.token_ids[4]]))[0]
    first = base.token_ids.index(base.token_ids[4])
    assert by_id.token_ids == base.token_ids[: first + 1] and by_id.finish_reason == "stop"


def test_n_completions_share_the_prompt_and_follow_their_seeds(llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=5, n=3, ignore_eos=True)
    out = llm.generate(["The quick brown fox"], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    single = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=10, temperature=1.0, seed=5,
                                                                  ignore_eos=True))[0]
    assert out.outputs[0].token_ids == single.token_ids
    greedy = llm.generate(["The quick brown fox"], SamplingParams(max_tokens=6, temperature=0.0, n=2))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_logprobs_match_transformers(llm, checkpoints):
    prompt = "The quick brown fox"
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True))[0]
    ids = Tokenizer.from_file(str(checkpoints["llama"] / "tokenizer.json")).encode(prompt).ids
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids + out.token_ids])).logits[0, len(ids) - 1:-1]
    expected = logits.log_softmax(-1)
    for step, lp in enumerate(out.outputs[0].logprobs):
        assert lp.token_id == out.token_ids[step]
        assert lp.logprob == pytest.approx(expected[step, lp.token_id].item(), abs=1e-4)
        top = expected[step].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logits_come_back_only_with_the_requests_that_ask_for_them(llm):
    """return_logits is a request's own: requests running in the same steps get none, and the
    asking ones get the logits they get alone, one row per token."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = llm.generate(MIXED[:2], params, return_logits=True)
    beside = [llm.submit(p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)) for p in MIXED[2:5]]
    asked = llm.generate(MIXED[:2], params, return_logits=True)
    assert all(h.result().outputs[0].logits is None for h in beside)
    for a, b in zip(asked, alone):
        assert a.token_ids == b.token_ids and a.outputs[0].logits.shape == (6, llm.engine.config.vocab_size)
        assert torch.allclose(a.outputs[0].logits, b.outputs[0].logits, atol=1e-4)
        assert a.outputs[0].logits.argmax(-1).tolist() == a.token_ids


def test_stream_yields_the_same_tokens_and_text_as_generate(llm):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    whole = llm.generate(["Café, naïve"], params)[0]
    chunks = list(llm.stream("Café, naïve", params))
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == "length" and not any(c.finished for c in chunks[:-1])


def test_leaving_a_stream_early_aborts_the_request_and_frees_its_blocks(llm):
    stream = llm.stream("hello", SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    next(stream)
    stream.close()
    deadline = time.time() + 10
    while llm.coordinator.scheduler.has_work() and time.time() < deadline:
        time.sleep(0.01)
    assert not llm.coordinator.scheduler.has_work()


def test_prompt_longer_than_the_limit_is_refused_not_truncated(llm):
    with pytest.raises(Exception, match="limit is 256 tokens"):
        llm.submit(list(range(300)))


def test_incremental_detokenization_is_exact_across_multibyte_characters(checkpoints):
    tok = EngineTokenizer(checkpoints["llama"])
    text = "Zürich, 日本語のテキスト, 🙂🚀 crème brûlée… “quotes”"
    ids = tok.encode(text)[1:]  # without BOS
    detok = IncrementalDetokenizer(tok, [0])
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


SCRIPT = textwrap.dedent("""
    import sys
    from dist_runtime import LLM, SamplingParams
    llm = LLM(sys.argv[1])
    outs = llm.generate(["hello", "a b c"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    print("TOKENS", [o.token_ids for o in outs])
""")


@pytest.mark.slow
def test_llm_api_under_mpirun_and_interpreter_exit_shut_down_every_rank(engines, tmp_path):
    engine = str(engines("llama", 2, 2))
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    under_mpi = subprocess.run([tool("mpirun"), "-np", "4", sys.executable, str(script), engine],
                               capture_output=True, text=True, timeout=120)
    spawned = subprocess.run([sys.executable, str(script), engine], capture_output=True, text=True, timeout=120)
    assert under_mpi.returncode == 0 and spawned.returncode == 0, under_mpi.stderr + spawned.stderr
    lines = [line for line in under_mpi.stdout.splitlines() if line.startswith("TOKENS")]
    assert lines == [line for line in spawned.stdout.splitlines() if line.startswith("TOKENS")]
    assert len(lines) == 1


def test_start_up_objects_are_kept_from_the_collector_while_the_engine_runs(engines):
    """A full collection walks every object it tracks: with the modules, weights and kernels of
    start-up among them it takes 80 ms, in which rank 0 launches nothing (BENCHMARKS.md). They
    are frozen once the engine is up, and thawed at shutdown so its cycles can go."""
    gc.unfreeze()
    with LLM(str(engines("llama", 1, 1, max_seq_len=256))) as llm:
        assert gc.get_freeze_count() > 10_000
        assert len(llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4
    assert gc.get_freeze_count() == 0


@pytest.mark.slow
def test_no_evict_policy_never_preempts_where_max_utilization_does_and_tokens_agree(engines):
    """A cache of 12 blocks (192 tokens) and 6 requests that each grow to 4 blocks: filling the
    cache preempts; never evicting admits fewer at once, preempts nothing, gives the same tokens."""
    prompts = [[i + 1] * 20 for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    runs = {}
    for policy in ("max_utilization", "no_evict"):
        with LLM(str(engines("llama", 1, 1)), num_kv_blocks=12, capacity_policy=policy, prefix_caching=False) as llm:
            runs[policy] = ([o.token_ids for o in llm.generate(prompts, params)], llm.stats()["preemptions"])
    assert runs["max_utilization"][1] > 0 and runs["no_evict"][1] == 0
    assert runs["no_evict"][0] == runs["max_utilization"][0]
