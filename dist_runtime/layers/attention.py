"""Attention over the paged KV cache. The torch reference (`reference`) is what the CPU runs
and what every fast path is checked against; on a GPU, decode steps use the Triton kernel
and prefill steps PyTorch's fused scaled-dot-product attention. An fp8 (E4M3) cache holds keys
and values divided by one static scale per KV head; every reader multiplies it back."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sharding.quantize import dequantize_kv, quantize_kv

# Whole prompts take FlashAttention first. cuDNN, which PyTorch prefers on Hopper, builds an
# execution plan for each new shape: 40 to 70 ms at each new count of prompts in a step.
FRESH_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]


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
        self.k_scale = self.v_scale = None  # [kv_heads] float32 when the cache is fp8, set by the runner
        self.kernels = None  # KernelChoices (the decode kernel's tuned launch), set by a GPU runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                rotary=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate q and k (with `rotary` at `positions`, if given), cache k and v, attend. On a
        GPU the rotation and the cache write are one kernel."""
        if q.is_cuda and rotary is not None:
            from dist_runtime.kernels.fused import rotary_

            rotary_(q, k, positions, rotary.inv_freq, rotary.interleaved, v, self.k_cache, self.v_cache,
                    meta.slot_mapping, self.k_scale, self.v_scale)
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
        launch = {"k_scale": self.k_scale, "v_scale": self.v_scale,
                  **(self.kernels.attention(decodes) if self.kernels is not None else {})}
        if meta.decode:  # the kernel's output as it is: no copy (a graph node per layer) into `out`
            return paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens_tensor,
                                          self.scale, self.sliding_window, **launch).flatten(1)
        out = torch.empty_like(q)
        if decodes:  # one kernel launch for every decoding sequence
            out[:decodes] = paged_decode_attention(q[:decodes], self.k_cache, self.v_cache,
                                                   meta.block_tables[:decodes], meta.context_lens_tensor[:decodes],
                                                   self.scale, self.sliding_window, **launch)
        if decodes < len(meta.context_lens):
            out[decodes:] = self.prefill(q[decodes:], k[decodes:], v[decodes:], meta, first=decodes)
        return out.flatten(1)

    def _context(self, i: int, meta: AttentionMetadata, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's cached keys and values, [context, kv_heads, head_dim] each, in `dtype`."""
        ctx = meta.context_lens[i]
        blocks = meta.block_tables[i, : -(-ctx // self.k_cache.shape[1])]
        keys, values = self.k_cache[blocks].flatten(0, 1)[:ctx], self.v_cache[blocks].flatten(0, 1)[:ctx]
        if self.k_scale is None:
            return keys.to(dtype), values.to(dtype)
        return dequantize_kv(keys, self.k_scale, dtype), dequantize_kv(values, self.v_scale, dtype)

    def reference(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for i, ctx in enumerate(meta.context_lens):
            start, end = meta.query_start[i], meta.query_start[i + 1]
            keys, values = self._context(i, meta, torch.float32)
            out[start:end] = self._attend(q[start:end], keys, values, ctx)
        return out

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: int) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * self.scale
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

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                first: int = 0) -> torch.Tensor:
        """Prefill of sequences `first`.. (whose tokens q, k, v hold) with fused attention. A run
        of fresh prompts of one length (their keys are this step's own) goes in a single call;
        a chunk that continues a prompt, or follows a cached prefix, reads its keys from the cache."""
        out = torch.empty_like(q)
        base = meta.query_start[first]
        i, n = first, len(meta.context_lens)
        while i < n:
            start = meta.query_start[i] - base
            length = meta.query_start[i + 1] - meta.query_start[i]
            run = 1
            if self.sliding_window is None and meta.context_lens[i] == length:
                while (i + run < n and meta.context_lens[i + run] == length
                       and meta.query_start[i + run + 1] - meta.query_start[i + run] == length):
                    run += 1
                end = start + run * length
                out[start:end] = self._fresh(q[start:end], k[start:end], v[start:end], run, length)
            else:
                end = start + length
                keys, values = self._context(i, meta, q.dtype)
                mask = ~self._mask(length, meta.context_lens[i], q.device)
                out[start:end] = F.scaled_dot_product_attention(
                    q[start:end].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
                    scale=self.scale, enable_gqa=True).transpose(0, 1)
            i += run
        return out

    def _fresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: int, length: int) -> torch.Tensor:
        """Causal attention of `seqs` whole prompts of `length` tokens each, in one call (their
        own keys and values, as computed: an fp8 cache's rounding does not reach them)."""
        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(seqs, length, -1, self.head_dim).transpose(1, 2)

        with sdpa_kernel(FRESH_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, scale=self.scale,
                                                 enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)
