"""Vocab-parallel embedding and LM head: each TP rank holds a contiguous range of the
(padded) vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_runtime.layers import declare, split, unsliced
from dist_runtime.layers.linear import linear


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up so that every TP rank holds the same number of rows."""
    return -(-vocab_size // tp) * tp


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


class _VocabParallel(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: int, tp_rank: int, comm, bias: bool = False):
        super().__init__()
        self.vocab_size, self.tp, self.comm = vocab_size, tp, comm
        padded = padded_vocab(vocab_size, tp)
        self.rows = padded // tp
        self.start = tp_rank * self.rows

        def shard(tensors: list[torch.Tensor]) -> torch.Tensor:
            return split(_pad_rows(unsliced(tensors), padded), 0, tp, tp_rank)

        self.weight = declare(nn.Parameter(torch.empty(self.rows, hidden)), "vocab", shard)
        self.bias = declare(nn.Parameter(torch.empty(self.rows)), "vocab", shard) if bias else None


class VocabParallelEmbedding(_VocabParallel):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(out)


class ScaledEmbedding(VocabParallelEmbedding):
    """Rows multiplied by `embed_scale` as they are looked up (Gemma: sqrt(hidden_size)), the
    factor first rounded to the weights' dtype, as transformers multiplies them."""

    def __init__(self, vocab_size: int, hidden: int, tp: int, tp_rank: int, comm, embed_scale: float):
        super().__init__(vocab_size, hidden, tp, tp_rank, comm)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return rows * torch.tensor(self.embed_scale, dtype=rows.dtype).item()


class ParallelLMHead(_VocabParallel):
    """Logits over the whole vocabulary: each rank computes its rows, then they are gathered."""

    kernels = None  # KernelChoices, set by a GPU runner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, self.bias, self.kernels)
        if self.tp > 1:
            logits = self.comm.all_gather(logits)
        return logits[..., : self.vocab_size]
