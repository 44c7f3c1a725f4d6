"""The rank-0 coordinator: requests in, Steps out to every rank, sampled tokens back."""

from __future__ import annotations

import itertools
import random

import numpy as np

from dist_runtime.block_manager import BlockManager
from dist_runtime.comm.base import Communicator
from dist_runtime.engine import Engine
from dist_runtime.errors import RequestError
from dist_runtime.model_runner import ModelRunner
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.scheduler import Scheduler
from dist_runtime.sequence import Sequence
from dist_runtime.step import Step


class Coordinator:
    def __init__(self, engine: Engine, runner: ModelRunner, comm: Communicator, eos_ids: tuple[int, ...]) -> None:
        plan = engine.plan
        self.runner, self.comm, self.eos_ids = runner, comm, eos_ids
        self.max_seq_len = plan.max_seq_len
        self.blocks = BlockManager(plan.num_kv_blocks, plan.block_size)
        self.scheduler = Scheduler(self.blocks, plan.max_batch_size, plan.max_num_tokens)
        self._ids = itertools.count()
        self.return_logits = False

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this engine's limit is "
                               f"{self.max_seq_len} tokens in all (max_seq_len), output included")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seq = Sequence(next(self._ids), prompt_ids, params, seed)
        self.scheduler.add(seq)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one step on every rank; returns the sequences it advanced."""
        batch = self.scheduler.schedule()
        step = self._pack(batch)
        self.comm.broadcast_object(step)
        out = self.runner.run(step)
        for i, ((seq, num_new), token) in enumerate(zip(batch, out.token_ids)):
            seq.num_cached += num_new
            seq.output_ids.append(token)
            if out.logits is not None:
                seq.logits.append(out.logits[i].clone())
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
        return [seq for seq, _ in batch]

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_seq_len:
            return "length"
        return None

    def _pack(self, batch: list[tuple[Sequence, int]]) -> Step:
        tokens, positions, slots, starts = [], [], [], [0]
        for seq, num_new in batch:
            start = seq.num_cached
            tokens += seq.token_ids[start:start + num_new]
            positions += range(start, start + num_new)
            slots += self.blocks.slots(seq, start, start + num_new)
            starts.append(starts[-1] + num_new)
        width = max(len(seq.block_table) for seq, _ in batch)
        tables = np.zeros((len(batch), width), dtype=np.int32)
        for i, (seq, _) in enumerate(batch):
            tables[i, : len(seq.block_table)] = seq.block_table
        seqs = [seq for seq, _ in batch]
        return Step(
            token_ids=np.array(tokens, dtype=np.int64),
            positions=np.array(positions, dtype=np.int64),
            slot_mapping=np.array(slots, dtype=np.int64),
            query_start=np.array(starts, dtype=np.int64),
            context_lens=np.array([seq.num_cached + n for seq, n in batch], dtype=np.int64),
            block_tables=tables,
            temperature=np.array([s.params.temperature for s in seqs], dtype=np.float32),
            top_k=np.array([s.params.top_k for s in seqs], dtype=np.int64),
            top_p=np.array([s.params.top_p for s in seqs], dtype=np.float32),
            seeds=np.array([s.seed for s in seqs], dtype=np.int64),
            sample_index=np.array([len(s.output_ids) for s in seqs], dtype=np.int64),
            return_logits=self.return_logits,
        )

    def shutdown(self) -> None:
        """Tell every other rank to leave its step loop."""
        self.comm.broadcast_object(None)


def serve_steps(runner: ModelRunner, comm: Communicator) -> None:
    """The loop of every rank but 0: run each Step rank 0 sends, until it sends None."""
    while (step := comm.broadcast_object(None)) is not None:
        runner.run(step)
