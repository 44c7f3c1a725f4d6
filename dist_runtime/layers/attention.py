"""Attention over the paged KV cache: the torch reference every fast kernel is checked against."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache (built from a Step by the runner)."""

    slot_mapping: torch.Tensor  # [tokens] flat cache slot (block * block_size + offset) of each token
    query_start: list[int]  # [seqs + 1] offsets of each sequence's tokens in the step
    context_lens: list[int]  # [seqs] tokens in the cache for each sequence, this step's included
    block_tables: torch.Tensor  # [seqs, max_blocks] block ids of each sequence


class PagedAttention(nn.Module):
    """Writes this step's keys and values into the cache, then attends causally over each
    sequence's cached context. Grouped-query: several query heads read one KV head."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window = scale, sliding_window
        self.k_cache = torch.empty(0)  # [blocks, block_size, kv_heads, head_dim], set by the runner
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        block_size = self.k_cache.shape[1]
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k.to(self.k_cache.dtype)
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v.to(self.v_cache.dtype)
        out = torch.empty_like(q)
        for i, ctx in enumerate(meta.context_lens):
            start, end = meta.query_start[i], meta.query_start[i + 1]
            blocks = meta.block_tables[i, : -(-ctx // block_size)]
            keys = self.k_cache[blocks].flatten(0, 1)[:ctx]
            values = self.v_cache[blocks].flatten(0, 1)[:ctx]
            out[start:end] = self._attend(q[start:end], keys, values, ctx)
        return out.flatten(1)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: int) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=1).float()
        values = values.repeat_interleave(group, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * self.scale
        query_pos = torch.arange(ctx - q.shape[0], ctx, device=q.device)[:, None]
        key_pos = torch.arange(ctx, device=q.device)[None, :]
        masked = key_pos > query_pos
        if self.sliding_window is not None:
            masked |= key_pos <= query_pos - self.sliding_window
        scores.masked_fill_(masked, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
