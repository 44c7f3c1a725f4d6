"""The paged KV cache's bookkeeping on rank 0: fixed-size blocks, each sequence's block table,
and prefix caching. The cache memory lives on every rank; only ownership lives here.

A full block is known by the hash of its tokens chained to the hash of the block before it,
so one hash names a whole prefix. Blocks nobody holds stay in the cache (evictable) until the
space is needed, least recently used first; a request whose prompt starts with a cached prefix
takes those blocks (reference counted) and skips their prefill.
"""

from __future__ import annotations

from collections import OrderedDict

from dist_runtime.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # to rule out hash collisions
        self.evictable: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU first
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.hit_tokens = 0  # prompt tokens served from the cache
        self.queried_tokens = 0  # prompt tokens looked up

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (free, or cached but held by nobody)."""
        return len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.evictable)

    def _chain(self, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def take_cached_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks its tokens start with; returns the
        tokens it may skip. The last token is always left to compute: its logits are needed."""
        assert not seq.block_table
        bs = self.block_size
        self.queried_tokens += len(seq)
        if not self.prefix_caching:
            return 0
        prev = None
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.tokens[i * bs:(i + 1) * bs])
            h = self._chain(prev, tokens)
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            self._ref(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            prev = h
        seq.num_cached = seq.cached_prompt_tokens = len(seq.block_table) * bs
        self.hit_tokens += seq.num_cached
        return seq.num_cached

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.evictable[block]
        self.ref_count[block] += 1

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can hold `num_tokens` tokens in all."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` blocks enough for `num_tokens` tokens in all (check can_grow first)."""
        while len(seq.block_table) < self.blocks_for(num_tokens):
            block, _ = self.evictable.popitem(last=False)
            if self.block_hash[block] is not None:  # evict its cached contents
                if self.cached.get(self.block_hash[block]) == block:
                    del self.cached[self.block_hash[block]]
                self.block_hash[block] = self.block_tokens[block] = None
            self.ref_count[block] = 1
            seq.block_table.append(block)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: make the blocks `seq` has now filled findable by later requests."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_cached // bs):
            tokens = tuple(seq.tokens[i * bs:(i + 1) * bs])
            h = self._chain(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block], self.block_tokens[block] = h, tokens

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; the last ones go first into the eviction order, so a shared
        prefix outlives the tails that hang off it."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.evictable[block] = None
        seq.block_table, seq.block_hashes, seq.num_cached = [], [], 0

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat cache slots of token positions [start, end) of `seq`."""
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]
