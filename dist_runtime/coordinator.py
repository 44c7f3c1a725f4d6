"""The rank-0 coordinator: requests in, Steps out to every rank, sampled tokens back.

It is the engine's loop: it asks the scheduler which sequences run how many tokens, packs
that into a Step, sends it to every rank, launches rank 0's own share, and applies the tokens of
the steps that have landed (each in its placeholder's place; a sequence that ends finishes
and gives its KV blocks back).

With overlap (one pipeline stage), step n+1 is scheduled and launched while the device still
runs step n: the scheduler counts step n's sampled tokens as placeholders, and a decoding
sequence's input token is step n's sampled id, which stays on the device (on the other TP
ranks too, after plain greedy steps). A sequence that meets a stop token in step n has
already a row in step n+1; that row's token is dropped. Step n+1 waits for step n's tokens
where the scheduler says so, or where the runner cannot feed them to it (see
_launch_ahead_of).
A sequence that ends gives its KV blocks back at once, though a step still running may
write to them: a step that reuses them is launched later, so it runs later on the one stream.

With pipeline stages (pp > 1), up to pp micro-batches are in flight, each over sequences the
others do not hold: while the last stage runs micro-batch A, rank 0 runs B in the first. A
micro-batch's tokens are applied before its sequences are scheduled again, so nothing runs one
step late. Every rank runs the Steps in the order rank 0 sends them (on each rank a step runs
after every step sent before it, which makes the early return of KV blocks safe here too).

Why nothing deadlocks: between any two ranks both sides issue their point-to-point messages
in Step order (and a TP group its collectives). Stage s sends hidden states to stage s+1 as it
runs each Step, and stage s+1 receives them as it runs the same Steps; the last stage sends
each Step's outputs to rank 0, which posts their receive (without waiting) when it launches
that Step, before the next. Rank 0 waits only for (a) stage 1 to take B's hidden states, which
it does once done with the steps before B, whose inputs were all sent already, and (b) A's
outputs, which the last stage sends once it has run A, whose inputs were all sent before.
Control messages go on their own tag (MPI) or their own sockets (ranks met over TCP), and
rank 0 does not wait for them to be taken (see Communicator.broadcast_object).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from dist_runtime.block_manager import BlockManager
from dist_runtime.engine import Engine
from dist_runtime.errors import RequestError
from dist_runtime.executor import Executor
from dist_runtime.liveness import Activity
from dist_runtime.model_runner import Launched, ModelRunner, StepOutput, plain_greedy
from dist_runtime.outputs import TokenLogprobs
from dist_runtime.runtime_config import RuntimeConfig
from dist_runtime.sampler import draw_seed
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.scheduler import Chunk, Scheduler
from dist_runtime.sequence import Sequence
from dist_runtime.step import Step

log = logging.getLogger(__name__)

TIMINGS_KEPT = 100_000  # the latest steps' timings, for bench


@dataclass
class TokenUpdate:
    """One sequence's new token from one step."""

    seq: Sequence
    token_id: int
    logprobs: TokenLogprobs | None


@dataclass
class StepTiming:
    running: int  # sequences in the step
    schedule_s: float  # scheduling and packing the Step
    broadcast_s: float  # handing it to the control plane (which does not wait for the ranks to take it)
    step_s: float  # the whole step, forward and sampling included (with overlap: also collecting the one before)
    launched_ahead: bool  # launched while another step was in flight (before its tokens reached the host)


@dataclass
class InFlight:
    """A launched step, until its tokens are collected."""

    chunks: list[Chunk]
    sampling: list[Sequence]  # in row order
    step: Step
    launched: Launched | None


class Coordinator:
    def __init__(self, engine: Engine, runner: ModelRunner, executor: Executor, eos_ids: tuple[int, ...],
                 config: RuntimeConfig, activity: Activity | None = None) -> None:
        plan = engine.plan
        self.activity = activity or Activity()  # the liveness watch reads how long a step has run
        self.runner, self.executor, self.eos_ids = runner, executor, eos_ids
        self.vocab_size = engine.config.vocab_size
        self.blocks = BlockManager(min(config.num_kv_blocks or runner.num_blocks, runner.num_blocks),
                                   plan.block_size, config.prefix_caching)
        # One sequence must always fit in the KV cache alone, or preemption could never end.
        self.max_seq_len = min(plan.max_seq_len, self.blocks.num_blocks * plan.block_size)
        self.scheduler = Scheduler(self.blocks, plan.max_batch_size, max(plan.max_num_tokens, plan.max_batch_size),
                                   self.max_seq_len, no_evict=config.capacity_policy == "no_evict")
        self._seq_ids = itertools.count()
        self.timings: deque[StepTiming] = deque(maxlen=TIMINGS_KEPT)  # bounded: a server runs for weeks
        self.peak_blocks_used = 0
        # One stage only: stage 0 has not got the sampled ids it would take as inputs. The other
        # TP ranks have them after plain greedy steps (see _launch_ahead_of).
        self.overlap = config.overlap and runner.mapping.pp == 1
        self.micro_batches = runner.mapping.pp if config.overlap and runner.mapping.pp > 1 else 1
        self._in_flight: deque[InFlight] = deque()  # launched steps, oldest first

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError for a request this engine cannot serve, before it is queued."""
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this engine's limit is "
                               f"{self.max_seq_len} tokens in all (max_seq_len), output included", "prompt")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})", "prompt")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise RequestError(f"logprobs: at most the vocabulary size {self.vocab_size}", "logprobs")
        biased = [t for t, _ in params.logit_bias]
        for field, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", biased)):
            if any(t >= self.vocab_size for t in ids):
                raise RequestError(f"{field}: token ids must be below the vocabulary size {self.vocab_size}", field)

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> list[Sequence]:
        """Queue a request: its n sequences (which share the prompt's cached blocks)."""
        self.check_request(prompt_ids, params)
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seqs = [Sequence(next(self._seq_ids), prompt_ids, params, seed if i == 0 else draw_seed(seed, -1 - i), i)
                for i in range(params.n)]
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._in_flight)

    def step(self) -> list[TokenUpdate]:
        """Launch the next step on every rank; returns the tokens that reached the host meanwhile:
        this step's; with overlap, the step's before, which ran while this one was scheduled;
        with micro-batches, the oldest's once one is in flight per stage."""
        with self.activity:
            start = time.perf_counter()
            updates = []
            if self.overlap and self._in_flight and not self._launch_ahead_of(self._in_flight[-1]):
                updates += self._collect(self._in_flight.popleft())
            scheduling = time.perf_counter()
            chunks = self.scheduler.schedule(placeholders=self.overlap)
            while not chunks and self._in_flight:  # nothing can run before the oldest step's tokens land
                updates += self._collect(self._in_flight.popleft())
                scheduling = time.perf_counter()
                chunks = self.scheduler.schedule(placeholders=self.overlap)
            if not chunks:
                return updates
            step, sampling = self._pack(chunks)
            log.debug("step of %d sequences, %d tokens", step.num_seqs, step.num_tokens)
            packed = time.perf_counter()
            self.executor.post("run", step)
            sent = time.perf_counter()
            self._in_flight.append(InFlight(chunks, sampling, step, self.runner.launch(step)))
            self.peak_blocks_used = max(self.peak_blocks_used, self.blocks.num_used)
            launched_ahead = len(self._in_flight) > 1
            # Left in flight: with overlap the step just launched; with micro-batches, one per
            # stage but the next step's; otherwise none.
            while len(self._in_flight) > (1 if self.overlap else self.micro_batches - 1):
                updates += self._collect(self._in_flight.popleft())
            self.timings.append(StepTiming(len(chunks), packed - scheduling, sent - packed,
                                           time.perf_counter() - start, launched_ahead))
            return updates

    def _launch_ahead_of(self, done: InFlight) -> bool:
        """Whether the next step may be launched before `done`'s tokens reach the host: not
        when its logits are wanted (the next graph replay overwrites them), nor, with TP, when
        only the sampling rank has its ids (after a plain greedy step each TP rank holds the
        same gathered logits and takes their argmax), nor when all its sequences have ended
        (stop strings, aborts): the engine is idle but for it, and starts again from the host's
        tokens, as it does after any idle spell."""
        step = done.step
        return (step.return_logits is None and (self.runner.mapping.tp == 1 or plain_greedy(step))
                and not all(c.seq.is_finished for c in done.chunks))

    def _collect(self, done: InFlight) -> list[TokenUpdate]:
        """Wait for a launched step's tokens and apply them, but to no sequence that ended
        while it ran (aborted, or stopped by the step before)."""
        out = self.runner.collect(done.launched)
        if out.logprobs is not None:
            out.logprobs = out.logprobs.cpu()  # one copy, not one per row
        now = time.perf_counter()
        for chunk in done.chunks:
            seq = chunk.seq
            if not seq.is_finished:
                seq.num_in_flight -= chunk.num_tokens
                seq.num_cached += chunk.num_tokens
                self.blocks.register_full_blocks(seq)
        # the logits of the rows whose requests asked for them (Step.return_logits), by row
        logits = {} if out.logits is None else dict(zip(done.step.return_logits.tolist(), out.logits))
        return [self._apply(seq, row, out, logits.get(row), now) for row, seq in enumerate(done.sampling)
                if not seq.is_finished]

    def _apply(self, seq: Sequence, row: int, out: StepOutput, logits: torch.Tensor | None,
               now: float) -> TokenUpdate:
        token = out.token_ids[row]
        seq.tokens.append(token)  # in its placeholder's place
        seq.num_placeholders -= 1
        seq.token_times.append(now)
        logprobs = None
        if out.logprobs is not None and seq.params.logprobs is not None:
            values = out.logprobs[row].tolist()
            n = seq.params.logprobs
            width = (len(values) - 1) // 2
            top = [(int(values[1 + i]), values[1 + width + i]) for i in range(n)]
            logprobs = TokenLogprobs(token, values[0], top)
            seq.logprobs.append(logprobs)
        if logits is not None:
            seq.logits.append(logits.clone())
        reason = self._finish_reason(seq, token)
        if reason:
            self.scheduler.finish(seq, reason)
        return TokenUpdate(seq, token, logprobs)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if self.scheduler.reaches_length_limit(seq, len(seq)):
            return "length"
        return None

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Finish a sequence now (a stop string matched, the client left); frees its blocks."""
        if not seq.is_finished:
            self.scheduler.finish(seq, reason)

    def _pack(self, chunks: list[Chunk]) -> tuple[Step, list[Sequence]]:
        """The Step for `chunks`, and the sequences that sample in it (in row order)."""
        tokens, positions, slots, starts, context = [], [], [], [0], []
        sample_rows, sampling = [], []
        for i, chunk in enumerate(chunks):
            seq, start, end = chunk.seq, chunk.start, chunk.end
            tokens += seq.tokens[start:end] if start < len(seq) else [0]  # a placeholder: see _prev_rows
            positions += range(start, end)
            slots += self.blocks.slots(seq, start, end)
            starts.append(starts[-1] + chunk.num_tokens)
            context.append(end)
            if chunk.samples:
                sample_rows.append(i)
                sampling.append(seq)
        tables = np.zeros((len(chunks), max(len(c.seq.block_table) for c in chunks)), dtype=np.int32)
        for i, chunk in enumerate(chunks):
            tables[i, : len(chunk.seq.block_table)] = chunk.seq.block_table
        params = [s.params for s in sampling]
        history, history_start, prompt_lens = [], [0], []
        for seq in sampling:
            if seq.params.has_penalties:
                history += seq.tokens
            history_start.append(len(history))
            prompt_lens.append(seq.num_prompt)
        step = Step(
            token_ids=np.array(tokens, dtype=np.int64),
            positions=np.array(positions, dtype=np.int64),
            slot_mapping=np.array(slots, dtype=np.int64),
            query_start=np.array(starts, dtype=np.int64),
            context_lens=np.array(context, dtype=np.int64),
            block_tables=tables,
            sample_rows=np.array(sample_rows, dtype=np.int64),
            temperature=np.array([p.temperature for p in params], dtype=np.float32),
            top_k=np.array([p.top_k for p in params], dtype=np.int64),
            top_p=np.array([p.top_p for p in params], dtype=np.float32),
            min_p=np.array([p.min_p for p in params], dtype=np.float32),
            seeds=np.array([s.seed for s in sampling], dtype=np.int64),
            sample_index=np.array([c.end - c.seq.num_prompt for c in chunks if c.samples], dtype=np.int64),
            num_logprobs=np.array([-1 if p.logprobs is None else p.logprobs for p in params], dtype=np.int64),
            penalties=np.array([(p.repetition_penalty, p.presence_penalty, p.frequency_penalty) for p in params],
                               dtype=np.float32).reshape(-1, 3),
            history=np.array(history, dtype=np.int64),
            history_start=np.array(history_start, dtype=np.int64),
            history_prompt_len=np.array(prompt_lens, dtype=np.int64),
            **_logit_biases(params),
            return_logits=_return_logits(params),
            prev_rows=self._prev_rows(chunks),
        )
        return step, sampling

    def _prev_rows(self, chunks: list[Chunk]) -> np.ndarray | None:
        """Step.prev_rows: for each chunk that runs a placeholder (it starts past the tokens the
        host has), its sequence's row among the sampled ids of the step in flight; -1 for the
        others; None when no chunk does."""
        if all(c.start < len(c.seq) for c in chunks):
            return None
        rows = {seq: row for row, seq in enumerate(self._in_flight[-1].sampling)}
        return np.array([rows[c.seq] if c.start >= len(c.seq) else -1 for c in chunks], dtype=np.int64)

    def rank_stats(self) -> list[dict]:
        """Every rank's memory figures and busy time (ModelRunner.stats)."""
        with self.activity:
            return self.executor.call("stats")

    def ping(self) -> None:
        self.executor.post("ping")

    def shutdown(self) -> None:
        """Let the device finish the steps still running (their tokens are no one's now) before
        its memory is released; the executor then tells every other rank to stop."""
        for done in self._in_flight:
            self.runner.collect(done.launched)
        self._in_flight.clear()


def _return_logits(params: list[SamplingParams]) -> np.ndarray | None:
    """The Step's return_logits: the rows whose requests want their logits, or None for no row."""
    rows = [row for row, p in enumerate(params) if p.return_logits]
    return np.array(rows, dtype=np.int64) if rows else None


def _logit_biases(params: list[SamplingParams]) -> dict[str, np.ndarray]:
    """The Step's bias_* arrays, or nothing when no row has a logit bias."""
    if not any(p.logit_bias for p in params):
        return {}
    pairs = [pair for p in params for pair in p.logit_bias]
    return {"bias_start": np.cumsum([0] + [len(p.logit_bias) for p in params], dtype=np.int64),
            "bias_ids": np.array([t for t, _ in pairs], dtype=np.int64),
            "bias_values": np.array([v for _, v in pairs], dtype=np.float32)}
