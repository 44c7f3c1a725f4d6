"""The rank-0 coordinator: requests in, Steps out to every rank, sampled tokens back.

It owns the scheduler and the KV-cache block manager, packs each step's batch into a Step,
broadcasts it, runs rank 0's own share of the step, and applies the sampled tokens.

With overlap (one pipeline stage), step n+1 is packed and launched while the device still
runs step n, whenever each of step n's sequences decodes in it or runs its prompt's next
chunk: the decodes' input tokens are step n's sampled ids, which stay on the device (on the
other TP ranks too, after greedy steps), a prompt's are on the host, and waiting requests
may join with their prompts. A sequence that meets a stop token in step n has
already a row in step n+1; that row's token is dropped. Anything else (see _follow) waits for
step n's tokens first.
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
from dist_runtime.scheduler import Scheduler
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
    ahead: bool  # launched before the previous step's tokens reached the host (or, with micro-batches, beside another)


@dataclass
class InFlight:
    """A launched step, until its tokens are collected."""

    batch: list[tuple[Sequence, int]]
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
        self.scheduler = Scheduler(self.blocks, plan.max_batch_size, max(plan.max_num_tokens, plan.max_batch_size))
        self._seq_ids = itertools.count()
        self.timings: deque[StepTiming] = deque(maxlen=TIMINGS_KEPT)  # bounded: a server runs for weeks
        self.peak_blocks_used = 0
        # One stage only: stage 0 has not got the sampled ids it would take as inputs. The other
        # TP ranks have them after plain greedy steps (see _follow).
        self.overlap = config.overlap and runner.mapping.pp == 1
        self._in_flight: InFlight | None = None
        self.micro_batches = runner.mapping.pp if config.overlap and runner.mapping.pp > 1 else 1
        self._pipeline: deque[InFlight] = deque()  # micro-batches in flight, oldest first

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
        return self.scheduler.has_work() or self._in_flight is not None or bool(self._pipeline)

    def step(self) -> list[TokenUpdate]:
        """Run one step on every rank; returns the tokens it produced. With overlap, it launches
        one step and returns the tokens of the one before, which ran meanwhile; with
        micro-batches, those of the oldest in flight, if it had to collect them."""
        with self.activity:
            return self._step() if self.micro_batches == 1 else self._pipelined_step()

    def _pipelined_step(self) -> list[TokenUpdate]:
        """Launch a micro-batch of sequences not in flight; first collect the oldest micro-batch
        if every slot is taken, or if nothing else can run."""
        start = time.perf_counter()
        updates = []
        if len(self._pipeline) == self.micro_batches:
            updates = self._collect(self._pipeline.popleft())
        scheduling = time.perf_counter()
        batch = self.scheduler.schedule(exclude={seq for f in self._pipeline for seq, _ in f.batch})
        if not batch:
            return updates + (self._collect(self._pipeline.popleft()) if self._pipeline else [])
        step, sampling = self._pack(batch)
        log.debug("micro-batch of %d sequences, %d tokens", step.num_seqs, step.num_tokens)
        packed = time.perf_counter()
        self.executor.post("run", step)
        sent = time.perf_counter()
        self._pipeline.append(InFlight(batch, sampling, step, self.runner.launch(step)))
        self.peak_blocks_used = max(self.peak_blocks_used, self.blocks.num_used)
        self.timings.append(StepTiming(len(batch), packed - scheduling, sent - packed, time.perf_counter() - start,
                                       len(self._pipeline) > 1))
        return updates

    def _step(self) -> list[TokenUpdate]:
        start = time.perf_counter()
        prev, self._in_flight = self._in_flight, None
        follow = self._follow(prev)
        updates = []
        if prev is not None and follow is None:  # the scheduler needs prev's tokens
            updates = self._collect(prev)
            if not self.scheduler.has_work():
                return updates
        scheduling = start if follow else time.perf_counter()
        batch, prev_rows, in_flight = follow or (self.scheduler.schedule(), None, None)
        step, sampling = self._pack(batch, prev_rows, in_flight)
        log.debug("step of %d sequences, %d tokens", step.num_seqs, step.num_tokens)
        packed = time.perf_counter()
        self.executor.post("run", step)
        sent = time.perf_counter()
        current = InFlight(batch, sampling, step, self.runner.launch(step))
        self.peak_blocks_used = max(self.peak_blocks_used, self.blocks.num_used)
        if follow is not None:
            updates = self._collect(prev)  # while the device runs `current`
        if self.overlap:
            self._in_flight = current
        else:
            updates = self._collect(current)
        self.timings.append(StepTiming(len(batch), packed - scheduling, sent - packed, time.perf_counter() - start,
                                       follow is not None))
        return updates

    def _follow(self, prev: InFlight | None
                ) -> tuple[list[tuple[Sequence, int]], list[int], dict[Sequence, int]] | None:
        """The step that can be launched before `prev`'s tokens reach the host: (batch, each
        sequence's row among prev's sampled ids, -1 for one whose tokens the host has, and the
        prompt tokens prev computes for sequences part-way through prefill), with KV blocks
        for what it adds. Every running sequence decodes the token prev sampled for it, or
        takes its prompt's next chunk; waiting ones join with their prompts while the budget
        and the blocks allow. None when the host needs prev's tokens first: penalties read
        them; prev's logits are wanted (the next graph replay overwrites them); the blocks are
        short; a running sequence was left out of prev; or sequences wait while others stop at
        a length limit and the free blocks might not cover what the waiting could take (the
        synchronous path would have the stopping ones' blocks too, and the steps must stay its
        steps). The stopping ones' places go to the waiting as there."""
        if prev is None or prev.step.return_logits is not None:
            return None
        if self.runner.mapping.tp > 1 and not plain_greedy(prev.step):
            return None  # only the sampling rank has prev's ids; its TP peers take the argmax
        rows = {seq: row for row, seq in enumerate(prev.sampling)}
        in_flight = {seq: n for seq, n in prev.batch if seq not in rows}  # prompt chunks, sampling nothing
        if any(seq not in rows and seq not in in_flight for seq in self.scheduler.running):
            return None
        # Those that prev's token takes to a length limit stop there (the rest of prev's
        # sequences finished while it ran).
        decoding = [s for s in self.scheduler.running if s in rows
                    and s.num_output + 1 < s.params.max_tokens and len(s) + 1 < self.max_seq_len]
        prefilling = [s for s in self.scheduler.running if s in in_flight]
        if not (decoding or prefilling) or any(s.params.has_penalties for s in decoding):
            return None
        stopping = len(self.scheduler.running) - len(decoding) - len(prefilling)
        batch, budget = dict.fromkeys(decoding, 1), self.scheduler.max_num_tokens - len(decoding)
        for seq in prefilling:  # the next chunk, as the scheduler would cut it
            if budget > 0:
                batch[seq] = min(len(seq) - seq.num_cached - in_flight[seq], budget)
                budget -= batch[seq]
        ends = {seq: len(seq) + 1 if seq in rows else seq.num_cached + in_flight[seq] + n for seq, n in batch.items()}
        needed = sum(self.blocks.blocks_for(end) - len(s.block_table) for s, end in ends.items())
        if stopping and self.scheduler.waiting and budget > 0:
            # the most that the joining ones can take, each from a whole block on
            joining = min(len(self.scheduler.waiting), self.scheduler.max_batch_size)
            needed += self.blocks.blocks_for(budget) + joining
        if needed > self.blocks.num_free:
            return None  # the scheduler preempts, or (with the stopping ones' blocks) admits more
        for seq, end in ends.items():
            self.blocks.grow(seq, end)
        self.scheduler.admit(batch, budget, excluded=stopping)
        return list(batch.items()), [rows.get(s, -1) for s in batch], in_flight

    def _collect(self, done: InFlight) -> list[TokenUpdate]:
        """Wait for a launched step's tokens and apply them, but to no sequence that ended
        while it ran (aborted, or stopped by the step before)."""
        out = self.runner.collect(done.launched)
        if out.logprobs is not None:
            out.logprobs = out.logprobs.cpu()  # one copy, not one per row
        now = time.perf_counter()
        for seq, n in done.batch:
            if not seq.is_finished:
                seq.num_cached += n
                self.blocks.register_full_blocks(seq)
        # the logits of the rows whose requests asked for them (Step.return_logits), by row
        logits = {} if out.logits is None else dict(zip(done.step.return_logits.tolist(), out.logits))
        return [self._apply(seq, row, out, logits.get(row), now) for row, seq in enumerate(done.sampling)
                if not seq.is_finished]

    def _apply(self, seq: Sequence, row: int, out: StepOutput, logits: torch.Tensor | None,
               now: float) -> TokenUpdate:
        token = out.token_ids[row]
        seq.tokens.append(token)
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
        if seq.num_output >= p.max_tokens or len(seq) >= self.max_seq_len:
            return "length"
        return None

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """Finish a sequence now (a stop string matched, the client left); frees its blocks."""
        if not seq.is_finished:
            self.scheduler.finish(seq, reason)

    def _pack(self, batch: list[tuple[Sequence, int]], prev_rows: list[int] | None = None,
              in_flight: dict[Sequence, int] | None = None) -> tuple[Step, list[Sequence]]:
        """The Step for `batch`, and the sequences that sample in it (in row order). A sequence
        with a row in `prev_rows` (see Step) runs the one token past those the host has; one
        in `in_flight` starts past the prompt tokens the step before is computing for it."""
        rows = prev_rows or [-1] * len(batch)
        in_flight = in_flight or {}
        tokens, positions, slots, starts, context = [], [], [], [0], []
        sample_rows, sampling, ahead = [], [], []
        for i, (seq, n) in enumerate(batch):
            ahead.append(int(rows[i] >= 0))
            start = len(seq) if ahead[i] else seq.num_cached + in_flight.get(seq, 0)
            end = start + n
            tokens += [0] if ahead[i] else seq.tokens[start:end]
            positions += range(start, end)
            slots += self.blocks.slots(seq, start, end)
            starts.append(starts[-1] + n)
            context.append(end)
            if end == len(seq) + ahead[i]:
                sample_rows.append(i)
                sampling.append(seq)
        tables = np.zeros((len(batch), max((len(s.block_table) for s, _ in batch), default=0)), dtype=np.int32)
        for i, (seq, _) in enumerate(batch):
            tables[i, : len(seq.block_table)] = seq.block_table
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
            sample_index=np.array([s.num_output + ahead[i] for i, s in zip(sample_rows, sampling)], dtype=np.int64),
            num_logprobs=np.array([-1 if p.logprobs is None else p.logprobs for p in params], dtype=np.int64),
            penalties=np.array([(p.repetition_penalty, p.presence_penalty, p.frequency_penalty) for p in params],
                               dtype=np.float32).reshape(-1, 3),
            history=np.array(history, dtype=np.int64),
            history_start=np.array(history_start, dtype=np.int64),
            history_prompt_len=np.array(prompt_lens, dtype=np.int64),
            **_logit_biases(params),
            return_logits=_return_logits(params),
            prev_rows=np.array(prev_rows, dtype=np.int64) if prev_rows is not None else None,
        )
        return step, sampling

    def rank_stats(self) -> list[dict]:
        """Every rank's memory figures and busy time (ModelRunner.stats)."""
        with self.activity:
            return self.executor.call("stats")

    def ping(self) -> None:
        self.executor.post("ping")

    def shutdown(self) -> None:
        """Let the device finish a step still running (its tokens are no one's now) before its
        memory is released; the executor then tells every other rank to stop."""
        for done in [self._in_flight, *self._pipeline]:
            if done is not None:
                self.runner.collect(done.launched)
        self._in_flight, self._pipeline = None, deque()


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
