"""No request can hurt the engine: one that rank 0 cannot carry through fails alone while the
others keep their tokens, and a hung rank ends every request, queued ones too, at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dist_runtime import LLM, SamplingParams, engine_loop
from dist_runtime.detokenizer import IncrementalDetokenizer
from dist_runtime.errors import DistRuntimeError, RequestFailed
from dist_runtime.liveness import RankLostError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
DOOMED = "this request's handling breaks"  # the prompt of the request made to fail
TWO = SamplingParams(max_tokens=24, temperature=0.8, seed=3, n=2, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(engines):
    with LLM(str(engines("llama", 1, 1))) as llm:
        yield llm


@pytest.fixture(scope="module")
def alone(llm):
    return llm.generate(["Hello, world!"], GREEDY)[0].token_ids


class BrokenDetokenizer(IncrementalDetokenizer):
    def add(self, token_id: int) -> str:
        raise ValueError(f"no text for token {token_id}")


def broken_sink(chunk) -> None:
    raise ConnectionError("the client's socket is closed")


def submit_doomed(llm: LLM, how: str, monkeypatch) -> engine_loop.RequestHandle:
    """A request whose sink, detokenizer or admission raises on rank 0 (input that passed the
    checks cannot make them raise, so the fault is put in by hand)."""
    if how == "sink":
        return llm.submit(DOOMED, TWO, stream=True, sink=broken_sink)
    if how == "detokenizer":
        monkeypatch.setattr(engine_loop, "IncrementalDetokenizer", BrokenDetokenizer)
        handle = llm.submit(DOOMED, TWO)
        monkeypatch.undo()
        return handle
    add_request = llm.coordinator.add_request

    def refuse_doomed(prompt_ids, params):
        if params is TWO:
            raise RuntimeError("no room for its sequences")
        return add_request(prompt_ids, params)

    monkeypatch.setattr(llm.coordinator, "add_request", refuse_doomed)
    return llm.submit(DOOMED, TWO)


@pytest.mark.parametrize("how, doing", [("sink", "handing a chunk to its sink"),
                                        ("detokenizer", "turning its tokens into text"),
                                        ("scheduler", "joining the scheduler")])
def test_a_request_that_fails_on_rank_0_fails_alone_and_the_engine_serves_on(llm, alone, how, doing,
                                                                             monkeypatch):
    greedy = llm.submit("Hello, world!", GREEDY)
    doomed = submit_doomed(llm, how, monkeypatch)
    with pytest.raises(RequestFailed, match=f"request {doomed.request_id} failed on rank 0 while {doing}"):
        doomed.result(timeout=60)
    assert greedy.result(timeout=60).token_ids == alone
    monkeypatch.undo()
    assert llm.generate(["Hello, world!"], GREEDY)[0].token_ids == alone
    assert llm.failed is None
    assert llm.coordinator.blocks.num_used == 0  # the failed request's KV blocks came back


@pytest.mark.slow
def test_a_request_queued_while_a_rank_hangs_gets_the_rank_named_at_once(engines):
    timeout_s = 4.0
    llm = LLM(str(engines("llama", 2, 1, max_batch_size=8, max_seq_len=512)), rank_timeout_s=timeout_s)
    try:
        running = llm.submit("Hello", SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
        deadline = time.monotonic() + 60
        while not (running.seqs and running.seqs[0].num_output >= 2):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(llm._executor.procs[0].pid, signal.SIGSTOP)  # rank 1
        time.sleep(0.5)  # the engine thread now waits in a step on rank 1
        start = time.monotonic()
        queued = llm.submit("a", GREEDY)
        with pytest.raises(RankLostError, match="rank 1 lost"):
            queued.result(timeout=timeout_s + 10)
        assert time.monotonic() - start < timeout_s + 5
        assert queued.seqs == []  # answered from the inbox: the engine thread never took it
        with pytest.raises(RankLostError, match="rank 1 lost"):
            running.result(timeout=1)
        with pytest.raises(DistRuntimeError, match="rank 1 lost"):
            llm.submit("b", GREEDY)
    finally:
        llm.abort()
