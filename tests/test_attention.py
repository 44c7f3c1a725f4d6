"""The fused-attention prefill path (used on GPUs) against the torch reference, on the CPU:
runs of fresh prompts, chunks that continue a prompt, cached prefixes, decodes in front."""

from __future__ import annotations

import pytest
import torch

from dist_runtime.layers.attention import AttentionMetadata, PagedAttention


@pytest.mark.parametrize("window", [None, 5])
def test_prefill_matches_the_reference_for_mixed_sequences(window):
    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 8, 2, 16, 4
    # (new tokens, context): two decodes, two fresh prompts of 6, a fresh 3, a chunk after 5 cached, a fresh 6
    seqs = [(1, 9), (1, 2), (6, 6), (6, 6), (3, 3), (4, 9), (6, 6)]
    attn = PagedAttention(heads, kv_heads, dim, dim**-0.5, window)
    blocks_per_seq = 3
    attn.k_cache = torch.randn(len(seqs) * blocks_per_seq, bs, kv_heads, dim, dtype=torch.float64)
    attn.v_cache = torch.randn_like(attn.k_cache)
    tables = torch.arange(len(seqs) * blocks_per_seq).view(len(seqs), blocks_per_seq)
    starts = [0]
    slots = []
    for i, (new, ctx) in enumerate(seqs):
        starts.append(starts[-1] + new)
        slots += [tables[i, p // bs].item() * bs + p % bs for p in range(ctx - new, ctx)]
    tokens = starts[-1]
    q = torch.randn(tokens, heads, dim, dtype=torch.float64)
    k = torch.randn(tokens, kv_heads, dim, dtype=torch.float64)
    v = torch.randn(tokens, kv_heads, dim, dtype=torch.float64)
    meta = AttentionMetadata(torch.tensor(slots), starts, [c for _, c in seqs], tables)
    attn.k_cache.view(-1, kv_heads, dim)[meta.slot_mapping] = k  # what forward() does first
    attn.v_cache.view(-1, kv_heads, dim)[meta.slot_mapping] = v
    expected = attn.reference(q, meta)
    got = attn.prefill(q[2:], k[2:], v[2:], meta, first=2)
    assert torch.allclose(got, expected[2:], atol=1e-5)  # the reference computes in float32
