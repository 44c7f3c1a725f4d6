"""CUDA graphs of the decode step (the forward and the logits), one per batch-size bucket,
captured at start-up and replayed every decode step: a decode step of an 8B model is a few
hundred small kernels, whose launch cost a graph removes. Prefill and mixed steps run eagerly."""

from __future__ import annotations

import torch

from dist_runtime.layers.attention import AttentionMetadata
from dist_runtime.models.base import CausalLM
from dist_runtime.step import Step


def buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 129, 16)) + list(range(160, 1025, 32))
    return [b for b in sizes if b < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, model: CausalLM, max_batch: int, max_blocks_per_seq: int, pad_block: int, block_size: int,
                 device: torch.device) -> None:
        self.model, self.device = model, device
        self.pad_slot = pad_block * block_size
        self.max_batch = max_batch
        n = max_batch
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), self.pad_slot, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.tables = torch.full((n, max_blocks_per_seq), pad_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        before = torch.cuda.memory_allocated(device)
        pool = torch.cuda.graph_pool_handle()
        for b in sorted(buckets(max_batch), reverse=True):  # largest first: the rest reuse its memory
            self.graphs[b] = self._capture(b, pool)
        torch.cuda.synchronize(device)
        self.memory_bytes = torch.cuda.memory_allocated(device) - before

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slots[:b], [], [], self.tables[:b], self.context_lens[:b], decode=True)
        return self.model.compute_logits(self.model(self.ids[:b], self.positions[:b], meta))

    def _capture(self, b: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._forward(b)  # compile and warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._forward(b)
        return graph, logits

    def fits(self, step: Step) -> bool:
        return step.num_tokens == step.num_seqs <= self.max_batch

    def run(self, step: Step) -> torch.Tensor:
        """Logits [seqs, vocab] of a decode step, by replaying the smallest graph that holds it."""
        n = step.num_seqs
        b = min(size for size in self.graphs if size >= n)
        width = step.block_tables.shape[1]
        self.ids[:n].copy_(torch.from_numpy(step.token_ids), non_blocking=True)
        self.positions[:n].copy_(torch.from_numpy(step.positions), non_blocking=True)
        self.slots[:n].copy_(torch.from_numpy(step.slot_mapping), non_blocking=True)
        self.context_lens[:n].copy_(torch.from_numpy(step.context_lens), non_blocking=True)
        self.tables[:n, :width].copy_(torch.from_numpy(step.block_tables), non_blocking=True)
        self.slots[n:b].fill_(self.pad_slot)  # padded rows write to the spare block and read one token of it
        self.context_lens[n:b].fill_(1)
        graph, logits = self.graphs[b]
        graph.replay()
        return logits[:n]
