"""In-flight batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget. Running sequences come first, decodes (one token each) before
the chunks of prompts still being prefilled, so decoding never waits behind a long prompt;
waiting sequences join with what budget is left, a long prompt a chunk at a time. When the
KV cache runs out of blocks, the newest running sequence is preempted: its blocks are freed
and it waits again at the head of the queue, to be recomputed (prefix caching makes that
cheap). No sequence is ever dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection

from dist_runtime.block_manager import BlockManager
from dist_runtime.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int) -> None:
        self.blocks = blocks
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, exclude: Collection[Sequence] = ()) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to run) pairs for the next step, with KV blocks reserved for them.
        The running sequences in `exclude` (in a step still running) are neither scheduled nor
        preempted, and do not count against the batch size."""
        batch: dict[Sequence, int] = {}  # insertion-ordered
        running = [s for s in self.running if s not in exclude]
        excluded = len(self.running) - len(running)  # none of them leaves the running list here
        decoding = [s for s in running if len(s) - s.num_cached == 1]
        prefilling = [s for s in running if len(s) - s.num_cached > 1]
        budget = self.max_num_tokens
        for seq in decoding + prefilling:
            if seq.status is Status.RUNNING and budget > 0:  # not preempted earlier in this loop
                n = min(len(seq) - seq.num_cached, budget)
                ok, refund = self._reserve(seq, n, batch, exclude)
                budget += refund
                if ok:
                    batch[seq] = n
                    budget -= n
        self.admit(batch, budget, excluded)
        return list(batch.items())

    def admit(self, batch: dict[Sequence, int], budget: int, excluded: int = 0) -> None:
        """Waiting sequences join `batch` (sequence: tokens) in order, with their cached prefix,
        while `budget` tokens, the batch size (less `excluded` running sequences) and the KV
        blocks allow; a long prompt takes what budget is left."""
        while self.waiting and budget > 0 and len(self.running) - excluded < self.max_batch_size:
            seq = self.waiting[0]
            self.blocks.take_cached_prefix(seq)
            n = min(len(seq) - seq.num_cached, budget)
            if not self.blocks.can_grow(seq, seq.num_cached + n):
                self.blocks.free(seq)  # give back the cached prefix it took; it tries again next step
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_cached + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch[seq] = n
            budget -= n

    def _reserve(self, seq: Sequence, n: int, batch: dict[Sequence, int],
                 exclude: Collection[Sequence]) -> tuple[bool, int]:
        """Blocks for `n` more tokens of a running sequence, preempting the newest running
        sequences not excluded (and unscheduling them) while there are not enough; `seq` is
        one of them. Returns whether `seq` stays, and the budget given back by unscheduled victims."""
        refund = 0
        while not self.blocks.can_grow(seq, seq.num_cached + n):
            victim = next(s for s in reversed(self.running) if s not in exclude)
            refund += batch.pop(victim, 0)
            self.preempt(victim)
            if victim is seq:
                return False, refund
        self.blocks.grow(seq, seq.num_cached + n)
        return True, refund

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq)
