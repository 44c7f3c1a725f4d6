"""Fused elementwise kernels for the GPU path, each replacing several torch ops (and their
memory round trips and launches) with one pass. References: RMSNorm.reference,
RotaryEmbedding.reference and activation.gated, which the tests compare them with."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sharding.quantize import FP8_MAX


@triton.jit
def _add_rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, n_cols, eps, HAS_RESIDUAL: tl.constexpr,
                        BLOCK: tl.constexpr):
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
    tl.store(out_ptr + row * n_cols + cols, w * (x32 * rstd).to(x.dtype), mask=mask)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
    """RMSNorm(x + residual) (or of x); with a residual, it is updated in place to x + residual."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    _add_rmsnorm_kernel[(x.numel() // n,)](x, residual if residual is not None else x, weight, out, n, eps,
                                           HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n),
                                           num_warps=8 if n >= 4096 else 4)
    return out


@triton.jit
def _rotate_head(base, i, mask, cos, sin, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rotate one head's rotary dims in place: pairs (2i, 2i + 1) for GPT-J, halves for Llama."""
    if INTERLEAVED:
        a_ptr, b_ptr = base + 2 * i, base + 2 * i + 1
    else:
        a_ptr, b_ptr = base + i, base + i + HALF
    a = tl.load(a_ptr, mask=mask, other=0.0)
    b = tl.load(b_ptr, mask=mask, other=0.0)
    a32, b32 = a.to(tl.float32), b.to(tl.float32)
    tl.store(a_ptr, (a32 * cos - b32 * sin).to(a.dtype), mask=mask)
    tl.store(b_ptr, (b32 * cos + a32 * sin).to(a.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, inv_freq_ptr, slots_ptr, k_cache, v_cache, k_scale_ptr,
                   v_scale_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, HQ: tl.constexpr,
                   KVH: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                   INTERLEAVED: tl.constexpr, WRITE_CACHE: tl.constexpr, KV_SCALED: tl.constexpr,
                   FP8_MAX: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.arange(0, HALF_PAD)
    mask = i < HALF
    freq = tl.load(positions_ptr + token).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=mask, other=0.0)
    cos, sin = tl.cos(freq), tl.sin(freq)
    if head < HQ:
        _rotate_head(q_ptr + token * stride_qt + head * stride_qh, i, mask, cos, sin, HALF, INTERLEAVED)
    else:
        kv_head = head - HQ
        k_row = k_ptr + token * stride_kt + kv_head * stride_kh
        _rotate_head(k_row, i, mask, cos, sin, HALF, INTERLEAVED)
        if WRITE_CACHE:  # the rotated key and the value go straight to the token's cache slot
            tl.debug_barrier()
            d = tl.arange(0, HEAD_DIM)
            dst = tl.load(slots_ptr + token) * (KVH * HEAD_DIM) + kv_head * HEAD_DIM + d
            k = tl.load(k_row + d)
            v = tl.load(v_ptr + token * stride_vt + kv_head * stride_vh + d)
            if KV_SCALED:  # an fp8 cache: divided by the KV head's scale, saturated at the format's limit
                k = tl.minimum(tl.maximum(k.to(tl.float32) / tl.load(k_scale_ptr + kv_head), -FP8_MAX), FP8_MAX)
                v = tl.minimum(tl.maximum(v.to(tl.float32) / tl.load(v_scale_ptr + kv_head), -FP8_MAX), FP8_MAX)
            tl.store(k_cache + dst, k.to(k_cache.dtype.element_ty))
            tl.store(v_cache + dst, v.to(v_cache.dtype.element_ty))


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
            v: torch.Tensor | None = None, k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
            slot_mapping: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
            v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place (the first
    2 * len(inv_freq) dims of each head); given the caches, also write k and v to their slots
    (an fp8 cache comes with float32 k_scale and v_scale [kv_heads], as quantize_kv takes)."""
    half = inv_freq.numel()
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    write = k_cache is not None
    v = v if write else k
    if tokens:
        _rotary_kernel[(tokens, heads + kv_heads)](
            q, k, v, positions, inv_freq, slot_mapping if write else positions, k_cache if write else k,
            v_cache if write else k, k if k_scale is None else k_scale, k if v_scale is None else v_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), HQ=heads, KVH=kv_heads,
            HEAD_DIM=head_dim, HALF=half, HALF_PAD=triton.next_power_of_2(half), INTERLEAVED=interleaved,
            WRITE_CACHE=write, KV_SCALED=k_scale is not None, FP8_MAX=FP8_MAX)
    return q, k


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + row * n_cols + cols, silu * up, mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up over a fused [gate | up] tensor [tokens, 2 * n]."""
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], n)
    block = 1024
    _silu_mul_kernel[(gate_up.numel() // (2 * n), triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out
