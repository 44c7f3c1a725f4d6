"""`dist-runtime generate` as users run it: spawned ranks or mpirun, batches, seeds, errors, cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import PROMPTS, cli, json_lines, mpirun, tool

from dist_runtime import LLM, SamplingParams

SAMPLED = ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "7", "--max-tokens", "10",
           "--ignore-eos", "--json"]


def _prompts(*prompts: str) -> list[str]:
    return [arg for p in prompts for arg in ("--prompt", p)]


@pytest.mark.slow
def test_spawned_ranks_give_the_same_tokens_as_mpirun(engines):
    engine = str(engines("llama", 2, 2))
    args = ["generate", engine, "--temperature", "0", "--max-tokens", "10", "--json", *_prompts(*PROMPTS)]
    assert json_lines(cli(*args)) == json_lines(mpirun(4, *args))


@pytest.mark.slow
def test_batched_prompts_equal_each_prompt_alone(engines):
    """The command's batch against each prompt alone, run through one LLM (its ranks started once)."""
    engine = str(engines("gptj", 2, 1))
    batch = json_lines(cli("generate", engine, "--temperature", "0", "--max-tokens", "8", "--json",
                           *_prompts(*PROMPTS)))
    with LLM(engine) as llm:
        alone = [llm.generate([p], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0] for p in PROMPTS]
    assert [(o["token_ids"], o["text"], o["finish_reason"]) for o in batch] == [
        (c.token_ids, c.text, c.finish_reason) for c in alone]


@pytest.mark.slow
def test_same_seed_same_tokens_whatever_the_layout(engines):
    runs = [json_lines(cli("generate", str(engines("llama", tp, pp)), *SAMPLED, *_prompts(*PROMPTS)))
            for tp, pp in [(1, 1), (2, 2), (4, 1)]]
    assert runs[0] == runs[1] == runs[2]
    greedy = json_lines(cli("generate", str(engines("llama", 1, 1)), "--temperature", "0", "--max-tokens",
                            "10", "--ignore-eos", "--json", *_prompts(*PROMPTS)))
    assert [o["token_ids"] for o in runs[0]] != [o["token_ids"] for o in greedy]


def test_another_seed_gives_other_tokens(engines):
    engine = str(engines("llama", 1, 1))
    first = json_lines(cli("generate", engine, *SAMPLED, *_prompts(*PROMPTS)))
    other = json_lines(cli("generate", engine, *[a if a != "7" else "8" for a in SAMPLED], *_prompts(*PROMPTS)))
    assert [o["token_ids"] for o in first] != [o["token_ids"] for o in other]


def test_json_output_has_one_object_per_prompt(engines):
    outs = json_lines(cli("generate", str(engines("llama", 1, 1)), "--max-tokens", "5", "--ignore-eos",
                          "--json", *_prompts(*PROMPTS)))
    assert [set(o) for o in outs] == [{"prompt", "token_ids", "text", "finish_reason"}] * len(PROMPTS)
    assert all(len(o["token_ids"]) == 5 and o["finish_reason"] == "length" for o in outs)


def test_rank_count_that_does_not_match_the_engine_is_a_clear_error(engines):
    proc = mpirun(2, "generate", str(engines("llama", 2, 2)), "--prompt", "hi")
    assert proc.returncode != 0
    assert "built for 4 ranks (tp=2 x pp=2); this job has 2 ranks" in proc.stderr


def test_prompt_longer_than_the_engine_allows_is_refused(engines):
    proc = cli("generate", str(engines("llama", 1, 1)), "--prompt", "hello " * 200)
    assert proc.returncode == 1
    assert "limit is 128 tokens" in proc.stderr


def test_bad_sampling_parameter_is_refused_before_ranks_start(engines):
    proc = cli("generate", str(engines("llama", 2, 2)), "--prompt", "hi", "--top-p", "0")
    assert proc.returncode == 1 and "top_p must be in (0, 1]" in proc.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read().split()[2] if os.path.exists(f"/proc/{pid}/stat") else "X"
    return stat != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_spawned_ranks_end_when_rank0_is_interrupted_or_killed(engines, sig):
    # 500 tokens on 4 ranks take several seconds: still running when the signal comes
    proc = subprocess.Popen([tool("dist-runtime"), "generate", str(engines("llama", 2, 2, max_seq_len=512)),
                             "--prompt", "hi", "--max-tokens", "500", "--ignore-eos"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while len(workers := _children(proc.pid)) < 3 and time.time() < deadline:
        time.sleep(0.2)
    assert len(workers) == 3
    time.sleep(1)  # let them join and start generating
    assert proc.poll() is None
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)


def test_generate_cli_takes_every_sampling_option(engines):
    outs = json_lines(cli("generate", str(engines("llama", 2, 1)), "--prompt", "hi", "--n", "2", "--seed", "3",
                          "--max-tokens", "4", "--logprobs", "2", "--min-p", "0.01", "--repetition-penalty", "1.1",
                          "--presence-penalty", "0.2", "--frequency-penalty", "0.1", "--stop", "zzz", "--json",
                          "--ignore-eos"))
    (record,) = outs
    assert [len(c["token_ids"]) for c in record["outputs"]] == [4, 4]
    first = record["outputs"][0]["logprobs"][0]
    assert first["token_id"] == record["outputs"][0]["token_ids"][0] and len(first["top"]) == 2
