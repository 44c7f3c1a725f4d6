"""Fused elementwise kernels for the GPU path, each replacing several torch ops (and their
memory round trips and launches) with one pass. References: RMSNorm.reference,
RotaryEmbedding.reference and activation.gated, which the tests compare them with."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _rotary_kernel(x_ptr, positions_ptr, inv_freq_ptr, stride_t, stride_h, HALF: tl.constexpr,
                   HALF_PAD: tl.constexpr, INTERLEAVED: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.arange(0, HALF_PAD)
    mask = i < HALF
    pos = tl.load(positions_ptr + token).to(tl.float32)
    freq = pos * tl.load(inv_freq_ptr + i, mask=mask, other=0.0)
    cos, sin = tl.cos(freq), tl.sin(freq)
    base = x_ptr + token * stride_t + head * stride_h
    if INTERLEAVED:  # pairs (2i, 2i + 1), GPT-J
        a_ptr, b_ptr = base + 2 * i, base + 2 * i + 1
    else:  # halves (i, i + half), Llama
        a_ptr, b_ptr = base + i, base + i + HALF
    a = tl.load(a_ptr, mask=mask, other=0.0)
    b = tl.load(b_ptr, mask=mask, other=0.0)
    a32, b32 = a.to(tl.float32), b.to(tl.float32)
    tl.store(a_ptr, (a32 * cos - b32 * sin).to(a.dtype), mask=mask)
    tl.store(b_ptr, (b32 * cos + a32 * sin).to(a.dtype), mask=mask)


def rotary_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2 * len(inv_freq) dims of every head of x [tokens, heads, head_dim], in place."""
    half = inv_freq.numel()
    if x.shape[0]:
        _rotary_kernel[(x.shape[0], x.shape[1])](x, positions, inv_freq, x.stride(0), x.stride(1), HALF=half,
                                                 HALF_PAD=triton.next_power_of_2(half), INTERLEAVED=interleaved)
    return x


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
