"""Attention over the paged KV cache. The torch reference (`reference`) is what the CPU runs
and what every fast path is checked against; on a GPU, decode steps use the Triton kernel
and prefill steps PyTorch's fused scaled-dot-product attention. An fp8 (E4M3) cache holds keys
and values divided by one static scale per KV head; every reader multiplies it back."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dist_runtime.step import to_device
from sharding.quantize import dequantize_kv, quantize_kv

# Whole prompts take FlashAttention first. cuDNN, which PyTorch prefers on Hopper, builds an
# execution plan for each new shape: 40 to 70 ms at each new count of prompts in a step.
FRESH_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]
# Prompt parts that read cached keys come with a mask, which FlashAttention does not take.
CACHED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
CACHED_BATCH_ELEMENTS = 1 << 24  # padded query rows x keys in one call of those (its mask: x query heads per KV head)


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
    # What every layer of the step derives alike (the prefill's batches, their index tensors):
    # derived by the first layer that needs it, not again in each of the others
    derived: dict = dataclasses.field(default_factory=dict, repr=False)

    def once(self, key: tuple, derive: Callable[[], object]) -> object:
        """derive(), computed by the first layer that asks for `key` and kept for the others."""
        if key not in self.derived:
            self.derived[key] = derive()
        return self.derived[key]


@dataclasses.dataclass
class CachedBatch:
    """Index tensors of one batch of prompt parts that read cached keys, the same in every layer."""

    rows: int  # queries per sequence, padded to the longest (a pad repeats the sequence's last query)
    width: int  # keys per sequence, the longest context
    queries: torch.Tensor  # [seqs * rows] each padded query's row of q
    blocks: torch.Tensor  # [seqs, width in blocks] the cache blocks holding their keys
    mask: torch.Tensor  # [seqs, 1, rows * group, width] True where a query sees a key
    kept: torch.Tensor  # rows among the padded queries that are not pads
    out_rows: torch.Tensor  # and the rows of `out` they go to


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
        chunks that continue a prompt, or follow a cached prefix, read their keys from the
        cache, batched too."""
        out = torch.empty_like(q)
        windowed = self.sliding_window is not None
        split = functools.partial(_prefill_batches, meta, first, windowed)
        runs, cached = meta.once(("prefill", first, windowed), split)
        for start, seqs, length in runs:
            end = start + seqs * length
            out[start:end] = self._fresh(q[start:end], k[start:end], v[start:end], seqs, length)
        group = self.num_heads // self.num_kv_heads
        for seqs in cached:
            batch = meta.once(("cached", first, tuple(seqs), group, self.sliding_window),
                              functools.partial(self._cached_batch, meta, seqs, meta.query_start[first], q.device))
            self._from_cache(q, out, batch)
        return out

    def _cached_batch(self, meta: AttentionMetadata, seqs: list[int], base: int, device: torch.device
                      ) -> CachedBatch:
        """The index tensors of `_from_cache` for sequences `seqs`, whose tokens start at row
        `base` of the step."""
        starts = np.array([meta.query_start[i] - base for i in seqs])
        new = np.array([meta.query_start[i + 1] - meta.query_start[i] for i in seqs])
        ctx = np.array([meta.context_lens[i] for i in seqs])
        rows, width = int(new.max()), int(ctx.max())
        j = np.arange(rows)
        tokens = (starts[:, None] + np.minimum(j, new[:, None] - 1)).ravel()  # [seqs * rows] rows of q
        position = to_device(ctx[:, None] - new[:, None] + j, device)[:, :, None]  # each row's place in its sequence
        key_position = torch.arange(width, device=device)
        visible = key_position <= position
        if self.sliding_window is not None:
            visible &= key_position > position - self.sliding_window
        kept = (j < new[:, None]).ravel()
        blocks = meta.block_tables[to_device(np.asarray(seqs), device), : -(-width // self.k_cache.shape[1])]
        group = self.num_heads // self.num_kv_heads
        return CachedBatch(rows, width, to_device(tokens, device), blocks,
                           visible.repeat_interleave(group, dim=1)[:, None],
                           to_device(np.flatnonzero(kept), device), to_device(tokens[kept], device))

    def _from_cache(self, q: torch.Tensor, out: torch.Tensor, batch: CachedBatch) -> None:
        """Attention of a batch's sequences over their cached keys, written into their rows of
        `out`: one call over their queries padded to the longest, pads dropped. The query heads
        sharing a KV head ride in the query dimension, so the call is plain multi-head attention
        with a mask, which the fused kernels take."""
        seqs = batch.blocks.shape[0]
        kv_heads, group = self.num_kv_heads, self.num_heads // self.num_kv_heads
        queries = q[batch.queries].view(seqs, batch.rows, kv_heads, group, -1)
        queries = queries.transpose(1, 2).flatten(2, 3)  # [seqs, kv_heads, rows * group, head_dim]
        keys, values = self._context(batch.blocks, batch.width, q.dtype)
        with sdpa_kernel(CACHED_BACKENDS, set_priority=True):
            attended = F.scaled_dot_product_attention(queries, keys.transpose(1, 2), values.transpose(1, 2),
                                                      attn_mask=batch.mask, scale=self.scale)
        attended = attended.unflatten(2, (batch.rows, group)).transpose(1, 2).flatten(0, 1).flatten(1, 2)
        out[batch.out_rows] = attended[batch.kept]

    def _fresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: int, length: int) -> torch.Tensor:
        """Causal attention of `seqs` whole prompts of `length` tokens each, in one call (their
        own keys and values, as computed: an fp8 cache's rounding does not reach them)."""
        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(seqs, length, -1, self.head_dim).transpose(1, 2)

        with sdpa_kernel(FRESH_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, scale=self.scale,
                                                 enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)


def _prefill_batches(meta: AttentionMetadata, first: int, windowed: bool
                     ) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
    """How `prefill` splits sequences `first`..: runs of fresh prompts of one length, as (first
    row counted from sequence `first`'s, prompts, length), and batches of those that read cached
    keys (all of them with a sliding window)."""
    runs, cached = [], []
    base = meta.query_start[first]
    i, n = first, len(meta.context_lens)
    while i < n:
        length = meta.query_start[i + 1] - meta.query_start[i]
        if windowed or meta.context_lens[i] != length:
            cached.append(i)
            i += 1
            continue
        run = 1
        while (i + run < n and meta.context_lens[i + run] == length
               and meta.query_start[i + run + 1] - meta.query_start[i + run] == length):
            run += 1
        runs.append((meta.query_start[i] - base, run, length))
        i += run
    return runs, _batches(cached, meta)


def _batches(seqs: list[int], meta: AttentionMetadata) -> list[list[int]]:
    """Sequences `seqs` by context length, cut into batches whose padded queries x keys stay
    within CACHED_BATCH_ELEMENTS (a sequence larger than that alone)."""
    batches, rows, width = [], 0, 0
    for i in sorted(seqs, key=lambda i: meta.context_lens[i]):
        new = meta.query_start[i + 1] - meta.query_start[i]
        grown_rows, grown_width = max(rows, new), max(width, meta.context_lens[i])
        if batches and (len(batches[-1]) + 1) * grown_rows * grown_width <= CACHED_BATCH_ELEMENTS:
            batches[-1].append(i)
            rows, width = grown_rows, grown_width
        else:
            batches.append([i])
            rows, width = new, meta.context_lens[i]
    return batches
