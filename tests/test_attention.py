"""The fused-attention prefill path (used on GPUs) against the torch reference, on the CPU:
runs of fresh prompts, chunks that continue a prompt, cached prefixes, decodes in front."""

from __future__ import annotations

import pytest
import torch

from dist_runtime.layers import attention
from dist_runtime.layers.attention import AttentionMetadata, PagedAttention


@pytest.mark.parametrize("batch_elements", [attention.CACHED_BATCH_ELEMENTS, 40])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_matches_the_reference_for_mixed_sequences(window, batch_elements, monkeypatch):
    """Chunks after cached keys go in batched calls: one, or (with a small budget) several."""
    monkeypatch.setattr(attention, "CACHED_BATCH_ELEMENTS", batch_elements)
    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 8, 2, 16, 4
    # (new tokens, context): two decodes, two fresh prompts of 6, a fresh 3, chunks after 5, 1
    # and 7 cached tokens, a fresh 6, a one-token chunk after 10 cached
    seqs = [(1, 9), (1, 2), (6, 6), (6, 6), (3, 3), (4, 9), (2, 3), (6, 6), (5, 12), (1, 11)]
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
    # A second layer reuses the step's index tensors (derived by the first), with its own keys.
    derived = dict(meta.derived)
    attn.k_cache, attn.v_cache = torch.randn_like(attn.k_cache), torch.randn_like(attn.v_cache)
    attn.k_cache.view(-1, kv_heads, dim)[meta.slot_mapping] = k
    attn.v_cache.view(-1, kv_heads, dim)[meta.slot_mapping] = v
    got = attn.prefill(q[2:], k[2:], v[2:], meta, first=2)
    assert torch.allclose(got, attn.reference(q, meta)[2:], atol=1e-5)
    assert meta.derived.keys() == derived.keys() and len(derived) > 1


def test_chunks_after_cached_keys_are_batched_within_the_budget(monkeypatch):
    """Batches by context length; each within the budget of padded queries x keys unless it
    holds one sequence; every sequence in exactly one."""
    new = [4, 1, 7, 2, 30, 3]
    context = [9, 40, 12, 5, 60, 11]
    starts = [0]
    for n in new:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(torch.empty(0), starts, context, torch.empty(0))
    monkeypatch.setattr(attention, "CACHED_BATCH_ELEMENTS", 150)
    batches = attention._batches(list(range(len(new))), meta)
    assert sorted(i for b in batches for i in b) == list(range(len(new)))
    assert [i for b in batches for i in b] == sorted(range(len(new)), key=context.__getitem__)
    for b in batches:
        assert len(b) == 1 or len(b) * max(new[i] for i in b) * max(context[i] for i in b) <= 150
    assert len(batches) > 2
    monkeypatch.setattr(attention, "CACHED_BATCH_ELEMENTS", 1 << 24)
    assert len(attention._batches(list(range(len(new))), meta)) == 1
