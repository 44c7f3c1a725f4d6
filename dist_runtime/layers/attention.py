"""Attention over the paged KV cache. The torch reference (`reference`) is what the CPU runs
and what every fast path is checked against; on a GPU, decoding sequences take one Triton
kernel (kernels/paged_decode.py) and the rest of a step, prompts and chunks of them, another
(kernels/paged_prefill.py), both reading keys and values from the cache. An fp8 (E4M3) cache
holds keys and values divided by one static scale per KV head; every reader multiplies it back.
Scores may be soft-capped (Gemma 2): tanh(score / cap) * cap, before the mask."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dist_runtime.quantization import dequantize_kv, quantize_kv
from dist_runtime.step import to_device


@dataclasses.dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache (built from a Step by the runner)."""

    slot_mapping: torch.Tensor  # [tokens] flat cache slot (block * block_size + offset) of each token
    query_start: list[int]  # [seqs + 1] offsets of each sequence's tokens in the step
    context_lens: list[int]  # [seqs] tokens in the cache for each sequence, this step's included
    block_tables: torch.Tensor  # [seqs, max_blocks] block ids of each sequence
    context_lens_tensor: torch.Tensor | None = None  # the same on the device (the decode kernel reads it)
    decode: bool = False  # every sequence brings exactly one token
    num_decodes: int = 0  # the leading sequences that bring one token each (the scheduler puts them first)
    # decode attention takes the launch the tuning kept for short contexts (a graph of its own)
    short_context_launch: bool = False
    # What every layer of the step derives alike (the prefill's batches, their index tensors):
    # derived by the first layer that needs it, not again in each of the others
    derived: dict = dataclasses.field(default_factory=dict, repr=False)

    def derive_once(self, key: tuple, derive: Callable[[], object]) -> object:
        """derive(), computed by the first layer that asks for `key` and kept for the others."""
        if key not in self.derived:
            self.derived[key] = derive()
        return self.derived[key]


class PagedAttention(nn.Module):
    """Writes this step's keys and values into the cache, then attends causally over each
    sequence's cached context. Grouped-query: several query heads read one KV head.
    `sliding_window`: a query sees only the last that many keys, itself included; `softcap`:
    the scores' soft cap (None: none)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window, self.softcap = scale, sliding_window, softcap
        self.k_cache = torch.empty(0)  # [blocks, block_size, kv_heads, head_dim], set by the runner
        self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = None  # [kv_heads] float32 when the cache is fp8, set by the runner
        self.kernels = None  # KernelChoices (the decode and prefill kernels' tuned launches), set by a GPU runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                rotary=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate q and k (with `rotary` at `positions`, if given), cache k and v, attend. On a
        GPU the rotation and the cache write are one kernel."""
        if q.is_cuda and rotary is not None:
            from dist_runtime.kernels.fused import rotary_

            rotary_(q, k, positions, rotary.inv_freq, rotary.interleaved, v, self.k_cache, self.v_cache,
                    meta.slot_mapping, self.k_scale, self.v_scale, rotary.attention_factor)
        else:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            for cache, x, scale in ((self.k_cache, k, self.k_scale), (self.v_cache, v, self.v_scale)):
                cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = (
                    x.to(cache.dtype) if scale is None else quantize_kv(x, scale))
        if not q.is_cuda:
            return self.reference(q, meta).flatten(1)
        from dist_runtime.kernels.paged_decode import paged_decode_attention

        decodes = len(meta.context_lens_tensor) if meta.decode else meta.num_decodes
        launch = {"k_scale": self.k_scale, "v_scale": self.v_scale, "softcap": self.softcap or 0.0,
                  **(self.kernels.attention(decodes, meta.short_context_launch) if self.kernels is not None else {})}
        if meta.decode:  # the kernel's output as it is: no copy (a graph node per layer) into `out`
            return paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens_tensor,
                                          self.scale, self.sliding_window, **launch).flatten(1)
        out = torch.empty_like(q)
        if decodes:  # one kernel launch for every decoding sequence
            out[:decodes] = paged_decode_attention(q[:decodes], self.k_cache, self.v_cache,
                                                   meta.block_tables[:decodes], meta.context_lens_tensor[:decodes],
                                                   self.scale, self.sliding_window, **launch)
        if decodes < len(meta.context_lens):
            self._prefill(q, out, meta, decodes)
        return out.flatten(1)

    def _context(self, blocks: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached keys and values of the sequences whose blocks are `blocks`,
        [seqs, length, kv_heads, head_dim] each, in `dtype` (past a sequence's own context:
        whatever its table points at)."""
        keys = self.k_cache[blocks].flatten(1, 2)[:, :length]
        values = self.v_cache[blocks].flatten(1, 2)[:, :length]
        if self.k_scale is None:
            return keys.to(dtype), values.to(dtype)
        return dequantize_kv(keys, self.k_scale, dtype), dequantize_kv(values, self.v_scale, dtype)

    def reference(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, ctx in enumerate(meta.context_lens):
            start, end = meta.query_start[i], meta.query_start[i + 1]
            blocks = meta.block_tables[i: i + 1, : -(-ctx // self.k_cache.shape[1])]
            keys, values = self._context(blocks, ctx, torch.float32)
            out[start:end] = self._attend(q[start:end], keys[0], values[0], ctx)
        return out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: int) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * self.scale
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores.masked_fill_(self._mask(q.shape[0], ctx, q.device), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)

    def _mask(self, num_queries: int, ctx: int, device: torch.device) -> torch.Tensor:
        """True where a query must not see a key: the future, and keys past the sliding window."""
        query_pos = torch.arange(ctx - num_queries, ctx, device=device)[:, None]
        key_pos = torch.arange(ctx, device=device)[None, :]
        masked = key_pos > query_pos
        if self.sliding_window is not None:
            masked |= key_pos <= query_pos - self.sliding_window
        return masked

    def _prefill(self, q: torch.Tensor, out: torch.Tensor, meta: AttentionMetadata, first: int) -> None:
        """Attention of sequences `first`.. (prompts, or chunks of them after cached keys) into
        their rows of `out`: one Triton launch for all, reading every key from the cache."""
        from dist_runtime.kernels.paged_prefill import launch_for, paged_prefill_attention, prefill_tiles

        tuned = self.kernels.prefill() if self.kernels is not None else None
        launch = tuned or launch_for(self.head_dim, self.k_scale is not None, q.dtype)
        tiles, query_start = meta.derive_once(("prefill", first, launch[0]), lambda: (
            to_device(prefill_tiles(meta.query_start, meta.context_lens, first, launch[0]), q.device),
            to_device(np.asarray(meta.query_start, dtype=np.int32), q.device)))
        paged_prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables, tiles, query_start,
                                meta.context_lens_tensor, self.scale, self.sliding_window, out, self.k_scale,
                                self.v_scale, launch, self.softcap or 0.0)
