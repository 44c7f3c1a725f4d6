"""Decode attention over the paged KV cache (one new token per sequence), in Triton.

One program per (sequence, KV head) loads each key and value once for all the query heads
that read that KV head (grouped-query attention), walking the sequence's block table
BLOCK_N tokens at a time with an online softmax. It takes only tensors, so a CUDA graph can
capture it. The reference is `PagedAttention.reference` (layers/attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_cache, v_cache, block_tables, context_lens, out_ptr, scale, window,
                         stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt, stride_ot, stride_oh,
                         BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(context_lens + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None],
                other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    for start in range((first // BLOCK_N) * BLOCK_N, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = (n < ctx) & (n >= first)
        block = tl.load(block_tables + seq * stride_bt + n // BLOCK_SIZE, mask=valid, other=0)
        offset = block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_cache + offset[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + offset[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g < GROUP)[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, block_n: int = 64) -> torch.Tensor:
    """q: [seqs, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    block_tables: [seqs, max_blocks] int32/64; context_lens: [seqs] (this token included)."""
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(seqs, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), BLOCK_SIZE=block_size, HEAD_DIM=head_dim, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
    )
    return out
