"""CUDA graphs of the decode step (the forward, the logits and their greedy argmax), one per
batch-size bucket, captured at start-up and replayed every decode step: a decode step of an
8B model is a few hundred small kernels, whose launch cost a graph removes. Prefill and mixed
steps run eagerly.

Where the build's tuning kept a decode-attention launch for short contexts beside its
overall pick (sharding/autotune.py), the bucket has a second graph with that launch, replayed
when every context of the step is that short.

A bucket's inputs (token ids, positions, cache slots, context lengths, block tables) are one
int64 range of one device buffer, filled by a single copy from a pinned host buffer: at
batch 1 the step's host work is a share of its time, and five copies cost five round trips."""

from __future__ import annotations

import logging
import statistics

import torch

from dist_runtime.layers.attention import AttentionMetadata
from dist_runtime.models.base import CausalLM
from dist_runtime.step import Step

log = logging.getLogger(__name__)


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int, rounds: int = 1) -> float:
    """Milliseconds per replay of `graph`, after one replay to warm up: the median of `rounds`
    timings of `replays` replays each (for benchmarks and tuners)."""
    graph.replay()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 1025, 32))
    return [b for b in sizes if b < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model: CausalLM, max_batch: int, max_blocks_per_seq: int, pad_block: int, block_size: int,
                 device: torch.device, short_contexts: dict[int, int] | None = None) -> None:
        """`short_contexts`: by bucket, the longest context of its short-context graph (none: 0)."""
        self.model, self.device = model, device
        self.pad_block, self.pad_slot = pad_block, pad_block * block_size
        self.max_batch, self.width = max_batch, max_blocks_per_seq
        size = self._size(max_batch)
        self.inputs = torch.zeros(size, dtype=torch.int64, device=device)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=True)
        self.host_array = self.host.numpy()
        self.copied = torch.cuda.Event()  # the last copy out of `host`: wait before writing it again
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.short_contexts = {b: n for b, n in (short_contexts or {}).items() if n}
        before = torch.cuda.memory_allocated(device)
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(buckets(max_batch), reverse=True):  # largest first: the rest reuse its memory
            for short_context_launch in (False, True) if b in self.short_contexts else (False,):
                self.graphs[b, short_context_launch] = self._capture(b, short_context_launch, pool)
            log.debug("captured the decode graph of batch %d", b)
        torch.cuda.synchronize(device)
        self.memory_bytes = torch.cuda.memory_allocated(device) - before

    @staticmethod
    def _rows(b: int) -> int:
        """Room for one input of bucket b: even, so that every input starts 16-byte aligned like an
        eager step's tensors. Triton specializes kernels on alignment: eager steps would compile
        kernels mid-run that the graphs' capture did not."""
        return b + b % 2

    def _size(self, b: int) -> int:
        return 4 * self._rows(b) + b * self.width

    def _views(self, buffer, b: int):
        """(ids, positions, slots, context lens, block tables [b, width]) of bucket b in `buffer`."""
        rows = self._rows(b)
        return (*buffer[: 4 * rows].reshape(4, rows)[:, :b], buffer[4 * rows: self._size(b)].reshape(b, self.width))

    def _forward(self, b: int, short_context_launch: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, positions, slots, context_lens, tables = self._views(self.inputs, b)
        meta = AttentionMetadata(slots, [], [], tables, context_lens, decode=True,
                                 short_context_launch=short_context_launch)
        logits = self.model.compute_logits(self.model(ids, positions, meta))
        return logits, logits.argmax(-1)

    def _capture(self, b: int, short_context_launch: bool,
                 pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        _, _, slots, context_lens, tables = self._views(self.inputs, b)
        slots.fill_(self.pad_slot)  # capture on padding rows: they write to the spare block
        context_lens.fill_(1)
        tables.fill_(self.pad_block)
        self._forward(b, short_context_launch)  # compile and warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits, greedy = self._forward(b, short_context_launch)
        return graph, logits, greedy

    def close(self) -> None:
        """Destroy the graphs now, not whenever the collector gets to them."""
        torch.cuda.synchronize(self.device)
        for graph, _, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def fits(self, step: Step) -> bool:
        return step.num_tokens == step.num_seqs <= self.max_batch

    def bucket(self, n: int) -> int:
        """The smallest captured batch that holds n rows."""
        return min(size for size, _ in self.graphs if size >= n)

    def run(self, step: Step, prev_sampled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [seqs, vocab], their argmax [seqs]) of a decode step, by replaying the
        smallest graph that holds it. With `prev_sampled`, the input tokens are its rows
        `step.prev_rows`, gathered on the device."""
        n = step.num_seqs
        b = self.bucket(n)
        short_context_launch = b in self.short_contexts and bool(step.context_lens.max() <= self.short_contexts[b])
        self.copied.synchronize()
        ids, positions, slots, context_lens, tables = self._views(self.host_array, b)
        # The rows travel in the token ids' place, so the inputs are still one copy.
        ids[:n] = step.token_ids if prev_sampled is None else step.prev_rows
        positions[:n], slots[:n] = step.positions, step.slot_mapping
        context_lens[:n] = step.context_lens
        # Padded rows write to the spare block and read one token of it. Every value is set:
        # the host buffer holds other buckets' layouts, where a slot could pose as a token id.
        ids[n:], positions[n:], slots[n:], context_lens[n:] = 0, 0, self.pad_slot, 1
        width = step.block_tables.shape[1]
        tables[:n, :width] = step.block_tables
        tables[:n, width:] = tables[n:] = self.pad_block
        used = self._size(b)
        self.inputs[:used].copy_(self.host[:used], non_blocking=True)
        self.copied.record()
        if prev_sampled is not None:
            device_ids = self._views(self.inputs, b)[0][:n]
            device_ids.copy_(prev_sampled[device_ids])
        graph, logits, greedy = self.graphs[b, short_context_launch]
        graph.replay()
        return logits[:n], greedy[:n]

