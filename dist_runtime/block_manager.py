"""The paged KV cache's bookkeeping on rank 0: fixed-size blocks and each sequence's block
table. The cache memory itself lives on every rank; only ownership lives here."""

from __future__ import annotations

from collections import deque

from dist_runtime.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can hold `num_tokens` tokens in all."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` blocks enough for `num_tokens` tokens in all."""
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat cache slots of token positions [start, end) of `seq`."""
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
