"""Fused elementwise kernels for the GPU path, each replacing several torch ops (and their
memory round trips and launches) with one pass. References: RMSNorm.reference (per head too,
for q and k), LayerNorm.reference, RotaryEmbedding.reference, activation.gated / activate and,
for the fp8 GEMM inputs that the norms and activations may write quantized,
layers.quantized.quantize_input; the tests compare them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dist_runtime.kernels import pdl
from dist_runtime.kernels.pdl import wait_for_inputs
from dist_runtime.quantization import FP8, FP8_MAX, Fp8Rows


@triton.jit
def _to_fp8(y, scale, FP8_MAX: tl.constexpr):
    """y / scale, correctly rounded as torch divides, saturated at the format's limit, in E4M3,
    rounded to nearest even by the hardware's conversion (compute capability 8.9 and up, which
    fp8 needs anyway): one instruction per two values, spelled out because Triton's cast has
    gone through float16 (rounding twice: 0.1% of values a step off torch's) in some versions.

    The division is y times the row's reciprocal, corrected once (Markstein): with the
    reciprocal correctly rounded, that is the correctly rounded quotient (emulated exactly on
    the CPU: every bf16 significand against 2M random float32 scales, no difference; on an H200,
    the same bits as `div_rn` from every quantizing kernel at 1,024 and 8,192 rows). A correctly
    rounded division per value (`div_rn`) expands to a long sequence with a slow path for tiny
    values, which GELU's negative tail takes often: on an H200, GELU quantizing [8192, 16384]
    takes 613 us with it and 370 us without. Zeros skip the correction, which would turn -0 into
    +0, and so do quotients past twice the limit (saturated anyway), where it could make a NaN."""
    y = y.to(tl.float32)
    inverse = tl.math.div_rn(1.0, scale)  # one per row
    q = y * inverse
    corrected = tl.fma(tl.fma(-q, scale, y), inverse, q)
    q = tl.where((q != 0) & (tl.abs(q) <= 2 * FP8_MAX), corrected, q)
    v = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    pairs = tl.inline_asm_elementwise("cvt.rn.satfinite.e4m3x2.f32 $0, $2, $1;", "=h,r,r", [v], dtype=tl.int8,
                                      is_pure=True, pack=2)
    return pairs.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _fp8_scale(amax, static_ptr, row, scale_ptr, STATIC: tl.constexpr, FP8_MAX: tl.constexpr):
    """A row's scale, stored for _scaled_mm: the calibrated one, or the row's largest magnitude
    mapped to FP8_MAX (an all-zero row gets 1), computed as dist_runtime.quantization.scales_for does."""
    if STATIC:
        scale = tl.load(static_ptr)
    else:
        scale = tl.where(amax > 0, amax * (1.0 / FP8_MAX), 1.0)
    tl.store(scale_ptr + row, scale)
    return scale


@triton.jit
def _add_rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr, static_ptr, n_cols, eps,
                        HAS_RESIDUAL: tl.constexpr, FP8_OUT: tl.constexpr, STATIC: tl.constexpr,
                        PLUS_ONE: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # residual <- x + residual, in the input dtype as the unfused model rounds it
        x = x + tl.load(residual_ptr + row * n_cols + cols, mask=mask, other=0.0)
        tl.store(residual_ptr + row * n_cols + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if PLUS_ONE:  # Gemma: x * (1 + w), all in float32, rounded once
        y = (x32 * rstd * (1.0 + w.to(tl.float32))).to(x.dtype)
    else:
        y = w * (x32 * rstd).to(x.dtype)
    if FP8_OUT:  # the next GEMM's input, quantized here instead of in a pass of its own
        scale = _fp8_scale(tl.max(tl.abs(y.to(tl.float32)), 0), static_ptr, row, scale_ptr, STATIC, FP8_MAX)
        y = _to_fp8(y, scale, FP8_MAX)
    tl.store(out_ptr + row * n_cols + cols, y, mask=mask)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                fp8: bool = False, input_scale: torch.Tensor | None = None,
                plus_one: bool = False) -> torch.Tensor | Fp8Rows:
    """RMSNorm(x + residual) (or of x); with a residual, it is updated in place to x + residual.
    With `fp8`, the result comes quantized for an fp8 GEMM (per row, or by the calibrated
    `input_scale`), as quantize_input would quantize it. `plus_one`: Gemma's weights, applied as
    1 + w in float32 (GemmaRMSNorm.reference)."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty_like(x, dtype=FP8 if fp8 else x.dtype)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32) if fp8 else out
    _add_rmsnorm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, scale,
                                 input_scale if input_scale is not None else scale, n, eps,
                                 HAS_RESIDUAL=residual is not None, FP8_OUT=fp8, STATIC=input_scale is not None,
                                 PLUS_ONE=plus_one, FP8_MAX=FP8_MAX, BLOCK=triton.next_power_of_2(n),
                                 num_warps=8 if n >= 4096 else 4,
                                 **pdl.launch(x))
    return Fp8Rows(out.view(rows, n), scale, x.dtype) if fp8 else out


@triton.jit
def _layernorm_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, scale_ptr, static_ptr, n_cols, eps,
                      FP8_OUT: tl.constexpr, STATIC: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    mean = tl.sum(x32, 0) / n_cols
    centred = tl.where(mask, x32 - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (centred * rstd * w + b).to(x.dtype)  # float32 throughout, rounded once, as LayerNorm.reference
    if FP8_OUT:
        scale = _fp8_scale(tl.max(tl.abs(y.to(tl.float32)), 0), static_ptr, row, scale_ptr, STATIC, FP8_MAX)
        y = _to_fp8(y, scale, FP8_MAX)
    tl.store(out_ptr + row * n_cols + cols, y, mask=mask)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, fp8: bool = False,
              input_scale: torch.Tensor | None = None) -> torch.Tensor | Fp8Rows:
    """LayerNorm over x's last dimension in one pass; with `fp8`, quantized for an fp8 GEMM
    as add_rmsnorm's output is."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty_like(x, dtype=FP8 if fp8 else x.dtype)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32) if fp8 else out
    if rows:
        _layernorm_kernel[(rows,)](x, weight, bias, out, scale, input_scale if input_scale is not None else scale, n,
                                   eps, FP8_OUT=fp8, STATIC=input_scale is not None, FP8_MAX=FP8_MAX,
                                   BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 4096 else 4,
                                   **pdl.launch(x))
    return Fp8Rows(out.view(rows, n), scale, x.dtype) if fp8 else out


@triton.jit
def _rotate_heads(row, stride_h, i, mask, cos, sin, HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rotate the rotary dims of a token's heads in place: pairs (2i, 2i + 1) for GPT-J, halves
    for Llama. cos and sin [HALF_PAD] are the token's, shared by every head."""
    h = tl.arange(0, HEADS_PAD)
    heads = row + h[:, None] * stride_h
    mask = (h < HEADS)[:, None] & mask[None, :]
    if INTERLEAVED:
        a_ptr, b_ptr = heads + 2 * i[None, :], heads + 2 * i[None, :] + 1
    else:
        a_ptr, b_ptr = heads + i[None, :], heads + i[None, :] + HALF
    a = tl.load(a_ptr, mask=mask, other=0.0)
    b = tl.load(b_ptr, mask=mask, other=0.0)
    a32, b32 = a.to(tl.float32), b.to(tl.float32)
    tl.store(a_ptr, (a32 * cos[None, :] - b32 * sin[None, :]).to(a.dtype), mask=mask)
    tl.store(b_ptr, (b32 * cos[None, :] + a32 * sin[None, :]).to(a.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, inv_freq_ptr, slots_ptr, k_cache, v_cache, k_scale_ptr,
                   v_scale_ptr, attention_factor, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   HQ: tl.constexpr, HQ_PAD: tl.constexpr, KVH: tl.constexpr, KVH_PAD: tl.constexpr,
                   HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                   INTERLEAVED: tl.constexpr, WRITE_CACHE: tl.constexpr, KV_SCALED: tl.constexpr,
                   FP8_MAX: tl.constexpr, PDL: tl.constexpr):
    """One program per token, for all its heads: cos and sin are computed once, and a prefill
    of 8,192 tokens launches 8,192 programs (one per token and head, it launched 327,680 for
    Llama-3-8B, and the launches cost more than the work)."""
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    mask = i < HALF
    freq = tl.load(positions_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=mask, other=0.0)
    cos, sin = tl.cos(freq) * attention_factor, tl.sin(freq) * attention_factor
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, i, mask, cos, sin, HQ, HQ_PAD, HALF, INTERLEAVED)
    k_row = k_ptr + token * stride_kt
    _rotate_heads(k_row, stride_kh, i, mask, cos, sin, KVH, KVH_PAD, HALF, INTERLEAVED)
    if WRITE_CACHE:  # the rotated keys and the values go straight to the token's cache slot
        tl.debug_barrier()  # the rotated keys, stored above by other threads, are read back whole
        h = tl.arange(0, KVH_PAD)
        d = tl.arange(0, HEAD_PAD)  # a power of two: Phi-3-mini's heads of 96 are read as 128, masked
        valid = (h < KVH)[:, None] & (d < HEAD_DIM)[None, :]
        # int64: a cache of more than 2^31 values, under an int32 slot mapping, too
        dst = tl.load(slots_ptr + token).to(tl.int64) * (KVH * HEAD_DIM) + h[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(k_row + h[:, None] * stride_kh + d[None, :], mask=valid)
        v = tl.load(v_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=valid)
        if KV_SCALED:  # an fp8 cache: divided by the KV head's scale, saturated at the format's limit
            k_scale = tl.load(k_scale_ptr + h, mask=h < KVH, other=1.0)[:, None]
            v_scale = tl.load(v_scale_ptr + h, mask=h < KVH, other=1.0)[:, None]
            k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -FP8_MAX), FP8_MAX)
            v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -FP8_MAX), FP8_MAX)
        tl.store(k_cache + dst, k.to(k_cache.dtype.element_ty), mask=valid)
        tl.store(v_cache + dst, v.to(v_cache.dtype.element_ty), mask=valid)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
            v: torch.Tensor | None = None, k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
            slot_mapping: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
            v_scale: torch.Tensor | None = None, attention_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place (the first
    2 * len(inv_freq) dims of each head, by cos and sin times `attention_factor`: longrope's);
    given the caches, also write k and v to their slots (an fp8 cache comes with float32 k_scale
    and v_scale [kv_heads], as quantize_kv takes)."""
    half = inv_freq.numel()
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    write = k_cache is not None
    v = v if write else k
    if tokens:
        _rotary_kernel[(tokens,)](
            q, k, v, positions, inv_freq, slot_mapping if write else positions, k_cache if write else k,
            v_cache if write else k, k if k_scale is None else k_scale, k if v_scale is None else v_scale,
            float(attention_factor), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            HQ=heads,
            HQ_PAD=triton.next_power_of_2(heads), KVH=kv_heads, KVH_PAD=triton.next_power_of_2(kv_heads),
            HEAD_DIM=head_dim, HEAD_PAD=triton.next_power_of_2(head_dim), HALF=half,
            HALF_PAD=triton.next_power_of_2(half), INTERLEAVED=interleaved,
            WRITE_CACHE=write, KV_SCALED=k_scale is not None, FP8_MAX=FP8_MAX, **pdl.launch(q))
    return q, k


@triton.jit
def _norm_heads_(row, stride_h, weight_ptr, eps, HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """RMSNorm over each head of one token, in place, rounded as RMSNorm.reference rounds it."""
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_PAD)
    mask = (h < HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    ptrs = row + h[:, None] * stride_h + d[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 1) / HEAD_DIM + eps)
    w = tl.load(weight_ptr + d, mask=d < HEAD_DIM, other=0.0)
    tl.store(ptrs, w[None, :] * (x32 * rstd[:, None]).to(x.dtype), mask=mask)


@triton.jit
def _qk_norm_kernel(q_ptr, k_ptr, q_weight, k_weight, q_eps, k_eps, stride_qt, stride_qh, stride_kt, stride_kh,
                    HQ: tl.constexpr, HQ_PAD: tl.constexpr, KVH: tl.constexpr, KVH_PAD: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    _norm_heads_(q_ptr + token * stride_qt, stride_qh, q_weight, q_eps, HQ, HQ_PAD, HEAD_DIM, HEAD_PAD)
    _norm_heads_(k_ptr + token * stride_kt, stride_kh, k_weight, k_eps, KVH, KVH_PAD, HEAD_DIM, HEAD_PAD)


def qk_norm_(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_eps: float,
             k_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over each head of q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim]
    (Qwen3's q_norm and k_norm), in place and in one launch: one program per token, reading the
    heads where they lie (views into the qkv GEMM's output) instead of a copy and a launch each."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    pad = triton.next_power_of_2(head_dim)
    if tokens:
        _qk_norm_kernel[(tokens,)](q, k, q_weight, k_weight, q_eps, k_eps, q.stride(0), q.stride(1), k.stride(0),
                                   k.stride(1), HQ=heads, HQ_PAD=triton.next_power_of_2(heads), KVH=kv_heads,
                                   KVH_PAD=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim, HEAD_PAD=pad,
                                   num_warps=8 if triton.next_power_of_2(heads) * pad >= 8192 else 4,
                                   **pdl.launch(q))
    return q, k


@triton.jit
def _silu_mul(row_ptr, cols, mask, n_cols):
    """SiLU(gate) * up for some columns of one [gate | up] row, rounded as the unfused model does."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row_ptr + n_cols + cols, mask=mask, other=0.0)
    return (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    tl.store(out_ptr + row * n_cols + cols, _silu_mul(gate_up_ptr + row * 2 * n_cols, cols, mask, n_cols), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up over a fused [gate | up] tensor [tokens, 2 * n]."""
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], n)
    block = 1024
    _silu_mul_kernel[(gate_up.numel() // (2 * n), triton.cdiv(n, block))](gate_up, out, n, BLOCK=block,
                                                                                  **pdl.launch(gate_up))
    return out


ACTS = {None: 0, "silu_mul": 1, "gelu_tanh": 2}  # what fp8_rows applies before quantizing


@triton.jit
def _row_values(row_ptr, cols, mask, n_cols, ACT: tl.constexpr):
    if ACT == 1:
        values = _silu_mul(row_ptr, cols, mask, n_cols)
    else:
        values = tl.load(row_ptr + cols, mask=mask, other=0.0)
        if ACT == 2:  # GELU (tanh) in float32, in torch's order: x * sigmoid(2u), equal in exact
            x = values.to(tl.float32)  # arithmetic, rounds 7% of bf16 results differently from torch
            u = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
            values = (0.5 * x * (1.0 + libdevice.tanh(u))).to(values.dtype)
    return values


@triton.jit
def _fp8_rows_kernel(x_ptr, out_ptr, scale_ptr, static_ptr, n_cols, ACT: tl.constexpr, STATIC: tl.constexpr,
                     FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per row. A row that fits in one BLOCK is read once and held in registers;
    a longer one takes a pass for its largest magnitude (unless the scale is static), then a
    pass that quantizes, reading the row back from cache."""
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * n_cols * (2 if ACT == 1 else 1)
    if n_cols <= BLOCK:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        values = _row_values(row_ptr, cols, mask, n_cols, ACT)
        scale = _fp8_scale(tl.max(tl.abs(values.to(tl.float32)), 0), static_ptr, row, scale_ptr, STATIC, FP8_MAX)
        tl.store(out_ptr + row * n_cols + cols, _to_fp8(values, scale, FP8_MAX), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        if not STATIC:
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                values = _row_values(row_ptr, cols, cols < n_cols, n_cols, ACT)
                amax = tl.maximum(amax, tl.abs(values.to(tl.float32)))
        scale = _fp8_scale(tl.max(amax, 0), static_ptr, row, scale_ptr, STATIC, FP8_MAX)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            values = _row_values(row_ptr, cols, mask, n_cols, ACT)
            tl.store(out_ptr + row * n_cols + cols, _to_fp8(values, scale, FP8_MAX), mask=mask)


# A row of up to ROW_BLOCK values is held in registers, a longer one takes two passes. On an H200
# at [8192, n] (BENCHMARKS.md), holding the row beats two passes of 1,024 to 8,192 values for
# every act (SiLU-and-mul at 14,336: 226 against 228-340 us; GELU at 16,384: 301 against
# 367-840 us), given enough threads; 4 warps are best for rows of 4,096.
ROW_BLOCK = 16384


def _warps(block: int) -> int:
    """Threads for a BLOCK of values: as measured best, 4 warps up to 4,096 values, 32 (16 values
    a thread) at 16,384."""
    return 4 if block <= 4096 else 16 if block <= 8192 else 32


def fp8_rows(x: torch.Tensor, input_scale: torch.Tensor | None = None, act: str | None = None) -> Fp8Rows:
    """x [tokens, n] quantized for an fp8 GEMM in one kernel (per row, or by the calibrated
    `input_scale`), as quantize_input quantizes it. `act` "gelu_tanh": GELU(x) is what gets
    quantized; "silu_mul": x is a fused [gate | up] [tokens, 2 * n], and SiLU(gate) * up is."""
    x = x.contiguous()
    n = x.shape[-1] // 2 if act == "silu_mul" else x.shape[-1]
    rows = x.numel() // x.shape[-1]
    out = torch.empty(rows, n, device=x.device, dtype=FP8)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(n), ROW_BLOCK)
    if rows:
        _fp8_rows_kernel[(rows,)](x, out, scale, input_scale if input_scale is not None else scale, n,
                                  ACT=ACTS[act], STATIC=input_scale is not None, FP8_MAX=FP8_MAX,
                                  BLOCK=block, num_warps=_warps(block),
                                  **pdl.launch(x))
    return Fp8Rows(out, scale, x.dtype)
