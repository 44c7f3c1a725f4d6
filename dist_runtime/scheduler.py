"""In-flight batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget. Running sequences come first, decodes (one token each) before
the chunks of prompts still being prefilled, so decoding never waits behind a long prompt;
waiting sequences join with what budget is left, a long prompt a chunk at a time. When the
KV cache runs out of blocks, the newest running sequence is preempted: its blocks are freed
and it waits again at the head of the queue, to be recomputed (prefix caching makes that
cheap). No sequence is ever dropped. With `no_evict` (TensorRT-LLM's GUARANTEED_NO_EVICT) a
waiting sequence joins only if the free blocks, less those every running sequence may still
need, hold it at its longest: then nothing is ever preempted, at the price of a cache
reserved for lengths a stop may cut short.

A step may be scheduled while steps before it still run. Their tokens count as taken, and
each token they sample counts as the sequence's own, a placeholder until the coordinator
puts the sampled id in its place. With `placeholders` on (one pipeline stage) a sequence runs
again at once, its input a placeholder, which the device fills from the sampled ids of the
step before. Such a step must be the one scheduled once those tokens land, or overlap would
change tokens; where it might not be (penalties read the tokens, blocks run short), schedule
says to wait for them instead. With placeholders off (pipeline micro-batches), a sequence
waits until its step has landed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dist_runtime.block_manager import BlockManager
from dist_runtime.sequence import Sequence, Status


@dataclass(slots=True)
class Chunk:
    """Tokens [start, end) of one sequence, run in one step. It `samples` the sequence's next
    token when `end` is the sequence's length, placeholders included."""

    seq: Sequence
    start: int
    end: int
    samples: bool

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int, max_seq_len: int,
                 no_evict: bool = False) -> None:
        self.blocks = blocks
        self.max_batch_size, self.max_num_tokens, self.max_seq_len = max_batch_size, max_num_tokens, max_seq_len
        self.no_evict = no_evict
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reaches_length_limit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` stops for its length once it holds `num_tokens` tokens."""
        return num_tokens - seq.num_prompt >= seq.params.max_tokens or num_tokens >= self.max_seq_len

    def schedule(self, placeholders: bool = False) -> list[Chunk] | None:
        """The next step's chunks, running sequences first, with KV blocks reserved for them,
        and each sequence's tokens in flight counted; None when the step must wait for the
        tokens of a step in flight. A sequence with a step in flight runs again only with
        `placeholders`; without, it is neither scheduled nor preempted, and does not count
        against the batch size."""
        running = [s for s in self.running if placeholders or not s.num_in_flight]
        on_placeholders = placeholders and any(s.num_in_flight for s in running)
        stopping = set()
        if on_placeholders:
            # Those whose token in flight takes them to a length limit stop there: they neither
            # run nor count against the batch size. (A stop token is known only once it lands:
            # that sequence runs one step more, whose token is dropped.)
            stopping = {s for s in running if s.num_placeholders
                        and self.reaches_length_limit(s, len(s) + s.num_placeholders)}
            running = [s for s in running if s not in stopping]
        excluded = len(self.running) - len(running)
        decoding, prefilling = [], []
        for seq in running:
            (decoding if seq.num_unscheduled == 1 else prefilling).append(seq)
        if on_placeholders:
            scheduled = self._schedule_on_placeholders(decoding + prefilling, bool(stopping))
        else:
            scheduled = self._schedule_preempting(decoding + prefilling)
        if scheduled is None:
            return None
        chunks, budget = scheduled
        self._admit(chunks, budget, excluded)
        for chunk in chunks.values():
            chunk.seq.num_in_flight += chunk.num_tokens
            chunk.seq.num_placeholders += chunk.samples
        return list(chunks.values())

    def _chunk(self, seq: Sequence, budget: int) -> Chunk:
        """The tokens of `seq` that no step has taken yet, as many as `budget` allows."""
        start, left = seq.num_cached + seq.num_in_flight, seq.num_unscheduled
        return Chunk(seq, start, start + min(left, budget), left <= budget)

    def _schedule_preempting(self, ordered: list[Sequence]) -> tuple[dict[Sequence, Chunk], int]:
        """Chunks of the running sequences in `ordered` with their blocks, preempting the newest
        running sequences not in flight while the blocks are short; and the budget left."""
        chunks: dict[Sequence, Chunk] = {}  # insertion-ordered
        budget = self.max_num_tokens
        for seq in ordered:
            if seq.status is Status.RUNNING and budget > 0:  # not preempted earlier in this loop
                chunk = self._chunk(seq, budget)
                kept, refund = self._reserve(chunk, chunks)
                budget += refund
                if kept:
                    chunks[seq] = chunk
                    budget -= chunk.num_tokens
        return chunks, budget

    def _reserve(self, chunk: Chunk, chunks: dict[Sequence, Chunk]) -> tuple[bool, int]:
        """Blocks for `chunk`, preempting the newest running sequences not in flight (and
        unscheduling them) while there are not enough; its own sequence is one of them.
        Returns whether that sequence stays, and the budget given back by unscheduled victims."""
        refund = 0
        while not self.blocks.can_grow(chunk.seq, chunk.end):
            victim = next(s for s in reversed(self.running) if not s.num_in_flight)
            victim_chunk = chunks.pop(victim, None)
            refund += victim_chunk.num_tokens if victim_chunk else 0
            self.preempt(victim)
            if victim is chunk.seq:
                return False, refund
        self.blocks.grow(chunk.seq, chunk.end)
        return True, refund

    def _schedule_on_placeholders(self, ordered: list[Sequence],
                                  stopping: bool) -> tuple[dict[Sequence, Chunk], int] | None:
        """Chunks of the running sequences in `ordered` while a step is in flight, or None where
        the step could differ from the one scheduled once its tokens land: penalties read
        every token, and short blocks would mean preempting, where the sequences that end with
        those tokens might have freed enough. Where sequences stop and others wait, their
        blocks would be free for the waiting to take too: the free blocks must cover the most
        the waiting can take."""
        if any(s.num_placeholders and s.params.has_penalties for s in ordered):
            return None
        chunks, budget = {}, self.max_num_tokens
        for seq in ordered:
            if budget > 0:
                chunks[seq] = chunk = self._chunk(seq, budget)
                budget -= chunk.num_tokens
        needed = sum(self.blocks.blocks_for(c.end) - len(c.seq.block_table) for c in chunks.values())
        if stopping and self.waiting and budget > 0:
            # the budget's blocks, and one more for each joining sequence (each starts a block of its own)
            needed += self.blocks.blocks_for(budget) + min(len(self.waiting), self.max_batch_size)
        if needed > self.blocks.num_free:
            return None
        for chunk in chunks.values():
            self.blocks.grow(chunk.seq, chunk.end)
        return chunks, budget

    def _blocks_to_finish(self, seq: Sequence) -> int:
        """Blocks `seq` may still take before a length limit ends it."""
        longest = min(seq.num_prompt + seq.params.max_tokens, self.max_seq_len)
        return max(0, self.blocks.blocks_for(longest) - len(seq.block_table))

    def _admit(self, chunks: dict[Sequence, Chunk], budget: int, excluded: int) -> None:
        """Waiting sequences join `chunks` in order, with their cached prefix, while `budget`
        tokens, the batch size (less `excluded` running sequences) and the KV blocks allow
        (with no_evict: the blocks not promised to running sequences hold it to its end);
        a long prompt takes what budget is left."""
        promised = sum(self._blocks_to_finish(s) for s in self.running) if self.no_evict else 0
        while self.waiting and budget > 0 and len(self.running) - excluded < self.max_batch_size:
            seq = self.waiting[0]
            self.blocks.take_cached_prefix(seq)
            chunk = self._chunk(seq, budget)
            if self.no_evict:
                fits = self._blocks_to_finish(seq) <= self.blocks.num_free - promised
            else:
                fits = self.blocks.can_grow(seq, chunk.end)
            if not fits:
                self.blocks.free(seq)  # give back the cached prefix it took; it tries again next step
                break
            self.waiting.popleft()
            self.blocks.grow(seq, chunk.end)
            promised += self._blocks_to_finish(seq) if self.no_evict else 0
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks[seq] = chunk
            budget -= chunk.num_tokens

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
