"""Which sequences run in the next step, and how many of their tokens.

Waiting prompts are admitted first-come first-served while the running batch has room, the
step's token budget lasts and the KV cache has blocks; otherwise every running sequence
decodes one token.
"""

from __future__ import annotations

from collections import deque

from dist_runtime.block_manager import BlockManager
from dist_runtime.sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int) -> None:
        self.blocks = blocks
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to run) pairs for the next step; blocks for them are reserved."""
        batch = self._admit()
        if batch:
            return batch
        for seq in self.running:
            self.blocks.grow(seq, len(seq))
        return [(seq, len(seq) - seq.num_cached) for seq in self.running]

    def _admit(self) -> list[tuple[Sequence, int]]:
        batch, budget = [], self.max_num_tokens
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            # A prompt longer than the budget still runs, alone, rather than never.
            if (batch and len(seq) > budget) or not self.blocks.can_grow(seq, len(seq)):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, len(seq))
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, len(seq)))
            budget -= len(seq)
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.running.remove(seq)
        self.blocks.free(seq)
