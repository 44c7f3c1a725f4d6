"""Prefill attention over the paged KV cache, in Triton: every prompt (or prompt chunk) of a
step in one launch, whatever their lengths and however much of each is already cached.

A program takes BLOCK_M consecutive queries of one sequence and one query head, and walks the
keys they may see (causal, and within a sliding window if any) BLOCK_N at a time through the
sequence's block table, with an online softmax (FlashAttention's). The keys below the tile's
first query are visible to all its queries and need no mask; only the tiles on the diagonal
(and, with a window, all of them) are masked. Query heads vary fastest in the grid, so the
heads that share a KV head read its keys together, from L2. The tiles come longest first (by
the keys they read), so the last wave of programs is short ones.

An fp8 cache is read as stored. With 16-bit queries the keys are multiplied as stored, on the
fp8 tensor cores, by q rounded to E4M3 at a scale per row (`round_q_e4m3`), and the values are
converted to float16 (exact, one instruction per two values). Rounding q adds an eighth to a
quarter to the attention error that the fp8 cache itself makes, and takes 17% (Llama-3-8B) and
34% (GPT-J) off a step's prefill attention between GEMMs (BENCHMARKS.md); values in fp8 too are
slower, as Hopper's fp8 products need them transposed.
DIST_RUNTIME_FP8_SCORES=0 keeps q exact (float16 products). Float32 queries convert keys and
values to float32. The per-KV-head scales fold into the softmax scale (keys) and the output
(values). Keys of this step's own tokens are read back from the cache too (written there just
before, by the rotary kernel), as the reference reads them: `PagedAttention.reference`
(layers/attention.py). A head that is not a power of two wide (Phi-3-mini's 96) is read
into tiles of HEAD_PAD, the next one, its extra columns masked to zero.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from dist_runtime.kernels import pdl
from dist_runtime.kernels.paged_decode import e4m3_rows, soft_cap
from dist_runtime.kernels.pdl import wait_for_inputs

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (head_dim, fp8 cache), for engines built without
# tuning (a tuned build times sharding.autotune.PREFILL_LAUNCHES on its GPU): the fastest on an H200
# over a step of five prompts or chunks of 544 to 2,048 tokens (BENCHMARKS.md). Over fp8 (fp8
# scores), timed between fp8 GEMMs at the clocks of the GPU's power cap, as in the engine: 574 us
# for head_dim 128 and 482 us for 256.
LOG2E = 1.4426950408889634  # the kernel's scores are in base 2 (exp2), its soft cap too
LAUNCH = {(128, False): (64, 64, 4, 2), (128, True): (64, 64, 4, 2), (256, False): (128, 128, 8, 2),
          (256, True): (64, 64, 4, 2)}
DEFAULT_LAUNCH = (64, 32, 4, 2)


# DIST_RUNTIME_FP8_SCORES=0: exact q, the keys converted to float16 (to compare accuracy)
FP8_SCORES_ON = os.environ.get("DIST_RUNTIME_FP8_SCORES", "1") != "0"


def fp8_scores_fit(head_dim: int) -> bool:
    """Whether fp8 scores are on, and an fp8 tensor-core product's reduction of 32 values or more."""
    return FP8_SCORES_ON and head_dim >= 32


def round_q_e4m3(q: torch.Tensor) -> torch.Tensor:
    """q as the fp8 scores take it: each row (one query head's vector) rounded to E4M3 at a
    scale of its largest magnitude over 448; for references (float32)."""
    q_max = q.float().abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return (q.float() * (448.0 / q_max)).to(torch.float8_e4m3fn).float() * (q_max / 448.0)


def launch_for(head_dim: int, fp8: bool, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """The launch for these queries: float32 ones (the GPU's exact path, for tests) take the
    small default tile, as 128 x 256 float32 tiles take Triton minutes to compile and then
    more shared memory than there is."""
    return DEFAULT_LAUNCH if dtype == torch.float32 else LAUNCH.get((head_dim, fp8), DEFAULT_LAUNCH)


def prefill_tiles(query_start: list[int], context_lens: list[int], first: int, block_m: int) -> np.ndarray:
    """[tiles, 2] int32 (sequence, first query) of sequences first.., BLOCK_M queries a tile,
    those that read the most keys first."""
    seq_ids, starts, keys = [], [], []
    for seq in range(first, len(context_lens)):
        new = query_start[seq + 1] - query_start[seq]
        for start in range(0, new, block_m):
            seq_ids.append(seq)
            starts.append(start)
            keys.append(context_lens[seq] - new + min(start + block_m, new))
    order = np.argsort(-np.asarray(keys, dtype=np.int64), kind="stable")
    return np.stack([np.asarray(seq_ids, np.int32)[order], np.asarray(starts, np.int32)[order]], axis=1)


@triton.jit
def _kv_rows(block_tables, seq, kv_head, start, ctx, stride_bt, stride_kb, stride_ks, stride_kh,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets into the caches of a sequence's tokens [start, start + BLOCK_N), through its block
    table (block 0 past its context, where the table may end)."""
    n = start + tl.arange(0, BLOCK_N)
    block = tl.load(block_tables + seq * stride_bt + n // BLOCK_SIZE, mask=n < ctx, other=0)
    return block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_ks + kv_head * stride_kh


@triton.jit
def _attend_tile(q, q_scale, k_cache, v_cache, block_tables, seq, kv_head, start, pos, ctx, window, m, denom, acc,
                 scale, stride_bt, stride_kb, stride_ks, stride_kh, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
                 PRECISION: tl.constexpr, F16: tl.constexpr, FP8_SCORES: tl.constexpr, SOFTCAP: tl.constexpr):
    """One BLOCK_N tile of keys into the online softmax (base-2: `scale` holds log2(e), and so
    does SOFTCAP: tanh(s / (cap log2(e))) cap log2(e) is the natural-unit cap in base 2)."""
    n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_PAD)
    rows = _kv_rows(block_tables, seq, kv_head, start, ctx, stride_bt, stride_kb, stride_ks, stride_kh, BLOCK_SIZE,
                    BLOCK_N)
    if MASKED:
        in_ctx = (n < ctx)[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_cache + rows[:, None] + d[None, :], mask=in_ctx, other=0.0)
        v = tl.load(v_cache + rows[:, None] + d[None, :], mask=in_ctx, other=0.0)
    elif HEAD_PAD != HEAD_DIM:
        k = tl.load(k_cache + rows[:, None] + d[None, :], mask=(d < HEAD_DIM)[None, :], other=0.0)
        v = tl.load(v_cache + rows[:, None] + d[None, :], mask=(d < HEAD_DIM)[None, :], other=0.0)
    else:
        k = tl.load(k_cache + rows[:, None] + d[None, :])
        v = tl.load(v_cache + rows[:, None] + d[None, :])
    if F16:  # E4M3 is exact in float16, and converts to it in one instruction per two values
        v = v.to(tl.float16)
    else:
        v = v.to(q.dtype)
    if FP8_SCORES:  # the keys as stored, q in E4M3 (q_scale: its rows' scales times `scale`)
        s = tl.dot(q, tl.trans(k)) * q_scale[:, None]
    else:
        s = tl.dot(q, tl.trans(k.to(v.dtype)), input_precision=PRECISION) * scale
    if SOFTCAP > 0:
        s = soft_cap(s, SOFTCAP)
    if MASKED:
        visible = (n[None, :] <= pos[:, None]) & (n[None, :] < ctx)
        if WINDOWED:
            visible &= n[None, :] > pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    if WINDOWED:  # a row may have seen no key yet: keep its exponentials finite (all zero)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, denom, acc


# Strides that vary per step (the table's row length) are not specialized, so a step whose
# longest context changes does not compile a new kernel.
@triton.jit(do_not_specialize=["stride_bt", "window"])
def _paged_prefill_kernel(q_ptr, k_cache, v_cache, k_scale_ptr, v_scale_ptr, block_tables, tiles_ptr, query_start,
                          context_lens, out_ptr, scale, window, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_bt, stride_ot, stride_oh, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr,
                          KV_SCALED: tl.constexpr, WINDOWED: tl.constexpr, PRECISION: tl.constexpr, F16: tl.constexpr,
                          FP8_SCORES: tl.constexpr, SOFTCAP: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    head = tl.program_id(0)
    tile = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    m0 = tl.load(tiles_ptr + 2 * tile + 1)
    q_begin = tl.load(query_start + seq)
    new = tl.load(query_start + seq + 1) - q_begin
    ctx = tl.load(context_lens + seq)
    kv_head = head // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_PAD)
    valid = rows < new
    in_head = valid[:, None] & (d < HEAD_DIM)[None, :]
    pos = ctx - new + rows  # each query's place in its sequence; pad rows lie past ctx
    q = tl.load(q_ptr + (q_begin + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=in_head, other=0.0)
    if KV_SCALED:
        scale = scale * tl.load(k_scale_ptr + kv_head)
    scale = scale * 1.4426950408889634  # log2(e): exp2 below
    q_scale = scale  # fp8 scores: each row's scale, times `scale`
    if FP8_SCORES:  # q rounded to E4M3 per row
        q, q_max = e4m3_rows(q.to(tl.float32))
        q_scale = q_max * (scale / 448.0)
    elif F16:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    first_pos = ctx - new + m0
    last = tl.minimum(first_pos + BLOCK_M, ctx)  # one past the last key any of its queries sees
    lo = 0
    if WINDOWED:
        lo = (tl.maximum(first_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
    # keys below `full` are seen by every query of the tile (no window): no mask
    full = lo if WINDOWED else ((first_pos + 1) // BLOCK_N) * BLOCK_N
    for start in range(lo, full, BLOCK_N):
        m, denom, acc = _attend_tile(q, q_scale, k_cache, v_cache, block_tables, seq, kv_head, start, pos, ctx,
                                     window, m, denom, acc, scale, stride_bt, stride_kb, stride_ks, stride_kh,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_PAD, False, WINDOWED, PRECISION, F16,
                                     FP8_SCORES, SOFTCAP)
    for start in range(full, last, BLOCK_N):
        m, denom, acc = _attend_tile(q, q_scale, k_cache, v_cache, block_tables, seq, kv_head, start, pos, ctx,
                                     window, m, denom, acc, scale, stride_bt, stride_kb, stride_ks, stride_kh,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_PAD, True, WINDOWED, PRECISION, F16,
                                     FP8_SCORES, SOFTCAP)
    out = acc / denom[:, None]
    if KV_SCALED:
        out = out * tl.load(v_scale_ptr + kv_head)
    tl.store(out_ptr + (q_begin + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=in_head)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, tiles: torch.Tensor, query_start: torch.Tensor,
                            context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                            out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None, launch: tuple[int, int, int, int] | None = None,
                            softcap: float = 0.0) -> torch.Tensor:
    """q: [tokens, heads, head_dim], the step's queries; caches [blocks, block_size, kv_heads,
    head_dim] holding every key the queries see, theirs included (q's dtype, or fp8 with float32
    k_scale and v_scale [kv_heads]); block_tables [seqs, max_blocks]; query_start [seqs + 1] and
    context_lens [seqs] (integers, on the device); `tiles` from `prefill_tiles()` at the
    launch's BLOCK_M, for the sequences to attend (the others' rows of `out` are left as they
    are). `launch`: (BLOCK_M, BLOCK_N, num_warps, num_stages), by default `launch_for`'s.
    `softcap`: scores become tanh(score / softcap) * softcap before the mask (0: as they are).
    Returns `out` (a new tensor like q if not given)."""
    _, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    block_m, block_n, num_warps, num_stages = launch or launch_for(head_dim, k_scale is not None, q.dtype)
    if block_n % block_size and block_size % block_n:
        raise ValueError(f"BLOCK_N {block_n} and the cache's block size {block_size}: one must divide the other")
    # over an fp8 cache, 16-bit queries take fp8 scores and float16 values (see the module's doc)
    f16 = k_scale is not None and q.dtype in (torch.bfloat16, torch.float16)
    out = torch.empty_like(q) if out is None else out
    if len(tiles):
        _paged_prefill_kernel[(heads, len(tiles))](
            q, k_cache, v_cache, q if k_scale is None else k_scale, q if v_scale is None else v_scale, block_tables,
            tiles, query_start, context_lens, out, scale, sliding_window or 0, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), out.stride(0),
            out.stride(1), GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
            HEAD_PAD=triton.next_power_of_2(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
            KV_SCALED=k_scale is not None, WINDOWED=sliding_window is not None,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", F16=f16,
            FP8_SCORES=f16 and fp8_scores_fit(head_dim),
            SOFTCAP=float(softcap) * LOG2E, num_warps=num_warps, num_stages=num_stages, **pdl.launch(q))
    return out
