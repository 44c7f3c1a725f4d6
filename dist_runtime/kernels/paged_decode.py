"""Decode attention over the paged KV cache (one new token per sequence), in Triton.

One program per (KV head, sequence, split) loads each key and value once for all the query
heads that read that KV head (grouped-query attention), walking its share of the sequence's
block table BLOCK_N tokens at a time with an online softmax. KV heads vary fastest in the
grid, so a sequence's heads run side by side and read each cached token's row together. With
one split it writes the output; with several (flash-decoding: a batch of one sequence has only
kv_heads programs for 132 SMs otherwise) each split writes its partial maximum, sum and
weighted values and a second kernel combines them. An fp8 cache is read as it is stored,
cast to q's dtype, or (`fp8_products`) its keys multiplied as stored on fp8 tensor cores with q
in two E4M3 parts; its per-KV-head scales fold into the softmax scale (keys) and the output
(values), both uniform in a program. It takes only tensors, so a CUDA graph can capture it. The
reference is `PagedAttention.reference` (layers/attention.py); the split count, BLOCK_N and
num_warps are tuned per batch size at build time (sharding/autotune.py). With one query head per
KV head (GPT-J), the tensor-core tile would be 15/16 padding, and the tuning may pick the
`vector` kernel: multiply-adds over [BLOCK_N, head_dim] tiles, summed over keys once at the end.
Scores may be soft-capped (Gemma 2), tanh(score / cap) * cap, before the mask and the softmax.
A head of HEAD_DIM values that is not a power of two (Phi-3-mini's 96) is read into tiles of
HEAD_PAD, the next one, its extra columns masked to zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_runtime.kernels import pdl
from dist_runtime.kernels.pdl import wait_for_inputs

DEFAULT = {"splits": 1, "block_n": 64, "num_warps": 4}


@triton.jit
def _e4m3_to_f16(x):
    """E4M3 to float16 (exact), four values in one 32-bit register, converted in the registers the
    load left them in. Triton's own conversion (pure) is moved past the shared-memory copy that
    lays a tile out for the tensor cores, where that layout reads the values back a byte at a
    time; an inline conversion not marked pure stays where it is written."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _kv_tile(k_cache, v_cache, block_tables, seq, kv_head, start, first, ctx, stride_bt, stride_kb, stride_ks,
             stride_kh, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             HEAD_PAD: tl.constexpr):
    """Keys and values, as stored, of a sequence's tokens [start, start + BLOCK_N), found through
    its block table; `valid` marks those in [first, ctx). Both loads are issued before either is
    used, so they are in flight together."""
    n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_PAD)
    valid = (n < ctx) & (n >= first)
    block = tl.load(block_tables + seq * stride_bt + n // BLOCK_SIZE, mask=valid, other=0)
    rows = block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
    mask = valid[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_cache + rows[:, None] + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache + rows[:, None] + d[None, :], mask=mask, other=0.0)
    return valid, k, v


@triton.jit
def soft_cap(s, CAP: tl.constexpr):
    """Scores squashed into (-CAP, CAP) as tanh(s / CAP) * CAP (Gemma 2's attention soft-capping);
    both attention kernels apply it before the mask, as the reference does. tanh through one
    exponential (which saturates to +-1 at either end), which Triton's interpreter runs too."""
    return (1.0 - 2.0 / (tl.exp(2.0 * s / CAP) + 1.0)) * CAP


@triton.jit
def e4m3_rows(x):
    """x [rows, cols] float32 in E4M3, each row at a scale of its largest magnitude over 448
    (E4M3's largest value): (the rounded rows, each row's largest magnitude). The fp8 products of
    both attention kernels take q this way."""
    x_max = tl.maximum(tl.max(tl.abs(x), 1), 1e-30)
    return (x * (448.0 / x_max)[:, None]).to(tl.float8e4nv), x_max


@triton.jit
def _fp8_products(q_ptr, k_cache, v_cache, block_tables, seq, kv_head, begin, end, first, ctx, scale, stride_qt,
                  stride_qh, stride_bt, stride_kb, stride_ks, stride_kh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    """The online softmax over keys [begin, end) of an fp8 cache, the scores from fp8 tensor-core
    products: (acc [GROUP_PAD, HEAD_PAD], maxima, sums). q goes in as two E4M3 parts, its rounding
    and what that left (scaled per row), in one operand of 2 * GROUP_PAD rows, so the scores keep
    about 2^-8 of q, closer than the cache's keys; the keys are multiplied as stored, on the
    tile's long side (S^T = K q^T), and the two parts' scores are summed after the product. The
    values are converted and multiplied in float16 (O^T = V^T P^T)."""
    r = tl.arange(0, 2 * GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    heads = kv_head * GROUP + r % GROUP_PAD
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=(r % GROUP_PAD < GROUP)[:, None] & (d < HEAD_DIM)[None, :], other=0.0).to(tl.float32)
    rounded, q_max = e4m3_rows(q)
    rest, rest_max = e4m3_rows(q - rounded.to(tl.float32) * (q_max / 448.0)[:, None])
    parts = tl.where((r < GROUP_PAD)[:, None], rounded, rest)
    part_scale = tl.where(r < GROUP_PAD, q_max, rest_max) * (scale / 448.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([HEAD_PAD, GROUP_PAD], tl.float32)
    for start in range(begin, end, BLOCK_N):
        valid, k, v = _kv_tile(k_cache, v_cache, block_tables, seq, kv_head, start, first, ctx, stride_bt, stride_kb,
                               stride_ks, stride_kh, BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_PAD)
        both = tl.dot(k, tl.trans(parts)) * part_scale[None, :]
        s = tl.sum(tl.reshape(both, [BLOCK_N, 2, GROUP_PAD]), 1)
        if SOFTCAP > 0:
            s = soft_cap(s, SOFTCAP)
        s = tl.where(valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        p = tl.exp(s - m_new[None, :])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, 0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(_e4m3_to_f16(v)), p.to(tl.float16))
        m = m_new
    return tl.trans(acc), m, denom


# A table's row stride is the longest context's block count in an eager step; specialized on
# (divisible by 16 or not), each mixed step could compile a kernel the decode graphs lack.
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_decode_kernel(q_ptr, k_cache, v_cache, k_scale_ptr, v_scale_ptr, block_tables, context_lens, out_ptr,
                         acc_ptr, ml_ptr, scale, window, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                         stride_bt, stride_ot, stride_oh, HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr, PARTIAL: tl.constexpr, KV_SCALED: tl.constexpr, VECTOR: tl.constexpr,
                         F16: tl.constexpr, CONVERT_ON_LOAD: tl.constexpr, FP8_PRODUCTS: tl.constexpr,
                         SOFTCAP: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    ctx = tl.load(context_lens + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_PAD)
    in_head = (d < HEAD_DIM)[None, :]
    heads = kv_head * GROUP + g
    if KV_SCALED:
        scale = scale * tl.load(k_scale_ptr + kv_head)
    first = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    # Splits take equal whole BLOCK_N chunks of [lo, ctx); a trailing split may get none. Every
    # chunk holds a valid key (lo's chunk holds `first`), so no row's maximum stays -inf in one.
    lo = (first // BLOCK_N) * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(ctx - lo, splits), BLOCK_N) * BLOCK_N
    begin = lo + split * chunk
    if FP8_PRODUCTS:
        end = tl.minimum(begin + chunk, ctx)
        acc, m, denom = _fp8_products(q_ptr, k_cache, v_cache, block_tables, seq, kv_head, begin, end, first, ctx,
                                      scale, stride_qt, stride_qh, stride_bt, stride_kb, stride_ks, stride_kh, GROUP,
                                      GROUP_PAD, BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_PAD, SOFTCAP)
    else:
        q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=(g < GROUP)[:, None] & in_head, other=0.0)
        if F16:  # keys and values (E4M3, exact in float16) then convert in one instruction per two
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    if VECTOR:  # one query head per KV head (GPT-J): multiply-adds on [BLOCK_N, HEAD_DIM] tiles
        qv = tl.sum(q.to(tl.float32), 0)  # [HEAD_PAD]; GROUP_PAD is 1
        weighted = tl.zeros([BLOCK_N, HEAD_PAD], tl.float32)  # summed over keys once, after the loop
        # The exponentials are taken against `ref`, which moves only when a score passes it by
        # more than e^8: the running maximum settles within a few tiles, and every other tile
        # then skips rescaling the whole [BLOCK_N, HEAD_DIM] sum (weights stay below e^8).
        ref = tl.max(m, 0)
        total = tl.sum(denom, 0)
        for start in range(begin, tl.minimum(begin + chunk, ctx), BLOCK_N):
            valid, k, v = _kv_tile(k_cache, v_cache, block_tables, seq, kv_head, start, first, ctx, stride_bt,
                                   stride_kb, stride_ks, stride_kh, BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_PAD)
            s = tl.sum(k.to(tl.float32) * qv[None, :], 1) * scale
            if SOFTCAP > 0:
                s = soft_cap(s, SOFTCAP)
            s = tl.where(valid, s, float("-inf"))
            tile_max = tl.max(s, 0)
            if tile_max > ref + 8.0:
                alpha = tl.exp(ref - tile_max)
                weighted = weighted * alpha
                total = total * alpha
                ref = tile_max
            p = tl.exp(s - ref)
            total += tl.sum(p, 0)
            weighted += p[:, None] * v.to(tl.float32)
        acc = tl.sum(weighted, 0)[None, :]
        m = tl.zeros([GROUP_PAD], tl.float32) + ref
        denom = tl.zeros([GROUP_PAD], tl.float32) + total
    elif not FP8_PRODUCTS:
        for start in range(begin, tl.minimum(begin + chunk, ctx), BLOCK_N):
            valid, k, v = _kv_tile(k_cache, v_cache, block_tables, seq, kv_head, start, first, ctx, stride_bt,
                                   stride_kb, stride_ks, stride_kh, BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_PAD)
            if CONVERT_ON_LOAD:
                k = _e4m3_to_f16(k)
                v = _e4m3_to_f16(v)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale
            if SOFTCAP > 0:
                s = soft_cap(s, SOFTCAP)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
            m = m_new
    if KV_SCALED:
        acc = acc * tl.load(v_scale_ptr + kv_head)
    if PARTIAL:  # [seqs, heads, splits] maxima and sums, [seqs, heads, splits, head_dim] weighted values
        row = (seq * HEADS + heads) * splits + split
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < GROUP)[:, None] & in_head)
        tl.store(ml_ptr + 2 * row, m, mask=g < GROUP)
        tl.store(ml_ptr + 2 * row + 1, denom, mask=g < GROUP)
    else:
        out = acc / denom[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & in_head)


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, out_ptr, splits, stride_ot, stride_oh, HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_PAD)
    valid = s < splits
    row = (seq * HEADS + head) * splits + s
    m = tl.load(ml_ptr + 2 * row, mask=valid, other=float("-inf"))
    denom = tl.load(ml_ptr + 2 * row + 1, mask=valid, other=0.0)
    weight = tl.exp(m - tl.max(m, 0))  # an empty split (maximum -inf) weighs 0
    acc = tl.load(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=valid[:, None] & (d < HEAD_DIM)[None, :],
                  other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(denom * weight, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# fp8 products on an H200 (Triton 3.6) give the reference's values with bfloat16 queries and 1 to 5
# query heads per KV head, but wrong ones for some heads with 8 (in 8 or 16 rows), and with float32
# queries; the fp8 tensor-core product needs 32 or more values a head.
FP8_PRODUCTS_GROUP, FP8_PRODUCTS_MIN_DIM = 4, 32


def fp8_products_fit(q_dtype: torch.dtype, group: int, head_dim: int, fp8_cache: bool) -> bool:
    """Whether the fp8-products launch may run this attention (the tuning offers it only then)."""
    return (fp8_cache and q_dtype in (torch.bfloat16, torch.float16) and group <= FP8_PRODUCTS_GROUP
            and head_dim >= FP8_PRODUCTS_MIN_DIM)


def _group_pad(group: int, vector: bool, fp8_products: bool) -> int:
    """Rows of a program's query tile: 1 for the vector kernel; 16 or more for a tensor-core tile;
    8 for fp8 products, whose q operand has twice as many (two parts) and whose scores' tile
    has a column per row."""
    if vector:
        return 1
    if fp8_products:
        return 8
    return max(16, triton.next_power_of_2(group))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, splits: int = 1, block_n: int = 64,
                           num_warps: int = 4, vector: bool = False, f16: bool = False, convert_on_load: bool = False,
                           fp8_products: bool = False, num_stages: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           softcap: float = 0.0) -> torch.Tensor:
    """q: [seqs, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim] (q's dtype,
    or fp8 with float32 k_scale and v_scale [kv_heads]); block_tables: [seqs, max_blocks]
    int32/64; context_lens: [seqs] (this token included). `vector`: for one query head per KV
    head only, products on the CUDA cores instead of a tensor-core tile padded to 16 rows. `f16`:
    for an fp8 cache, the tensor-core products in float16, not q's dtype (E4M3 converts to
    float16 in one instruction per two values, to bfloat16 in three; float16 holds q's values
    to 65,504 with more precision, and is clamped there). `convert_on_load`: with f16, each tile
    converted as loaded, before the shared-memory copy that lays it out for the tensor cores
    (fewer instructions and registers; Triton converts after it, which takes half the shared
    memory when the loads are pipelined). `fp8_products`: for an fp8 cache, the scores from fp8
    tensor-core products of the keys as stored and q in two E4M3 parts (_fp8_products; Hopper's
    wgmma, so 4 warps). `num_stages`: how deep Triton pipelines the tensor-core loop's loads
    (1: not at all; None: Triton's default, 3 on Hopper). `softcap`: scores become
    tanh(score / softcap) * softcap before the mask (0: as they are)."""
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if vector and group != 1:
        raise ValueError(f"the vector kernel takes one query head per KV head, not {group}")
    if f16 and (k_scale is None or vector or q.dtype != torch.bfloat16):
        raise ValueError("f16 is for the tensor-core kernel over an fp8 cache, with bfloat16 queries")
    if convert_on_load and not f16:
        raise ValueError("convert_on_load is for f16 products")
    if fp8_products and (f16 or vector or not fp8_products_fit(q.dtype, group, head_dim, k_scale is not None)):
        raise ValueError(f"fp8_products is for an fp8 cache, 16-bit queries, at most {FP8_PRODUCTS_GROUP} query heads "
                         f"per KV head and heads of {FP8_PRODUCTS_MIN_DIM} or more, without f16 or vector")
    out = torch.empty_like(q)
    partial = splits > 1
    acc = torch.empty(seqs, heads, splits, head_dim, dtype=torch.float32, device=q.device) if partial else out
    ml = torch.empty(seqs, heads, splits, 2, dtype=torch.float32, device=q.device) if partial else out
    # sequences on the grid's y axis, which holds 65,535: a decode batch is far smaller
    _paged_decode_kernel[(kv_heads, seqs, splits)](
        q, k_cache, v_cache, q if k_scale is None else k_scale, q if v_scale is None else v_scale, block_tables,
        context_lens, out, acc, ml, scale, sliding_window or 0, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1), HEADS=heads,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_PAD=triton.next_power_of_2(head_dim), GROUP=group,
        GROUP_PAD=_group_pad(group, vector, fp8_products), BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PARTIAL=partial, KV_SCALED=k_scale is not None,
        VECTOR=vector, F16=f16, CONVERT_ON_LOAD=convert_on_load, FP8_PRODUCTS=fp8_products,
        SOFTCAP=float(softcap), num_warps=num_warps,
        **({"num_stages": num_stages} if num_stages else {}),
        **pdl.launch(q),
    )
    if partial:
        _combine_kernel[(seqs, heads)](acc, ml, out, splits, out.stride(0), out.stride(1), HEADS=heads,
                                       HEAD_DIM=head_dim, HEAD_PAD=triton.next_power_of_2(head_dim),
                                       SPLITS_PAD=triton.next_power_of_2(splits),
                                       **pdl.launch(q))
    return out
