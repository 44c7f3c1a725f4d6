"""y = x W^T (+ b) for a few rows of x (decode batches of up to 16 tokens), in Triton.

At these sizes a linear layer only streams its weight from memory, and the question is
which kernel keeps the most bytes in flight: cuBLAS's GEMV/GEMM or this one, where each
program owns BLOCK_N output columns and walks K in BLOCK_K steps (pipelined loads, rows of x
padded to 16 for the tensor cores). For one row, BLOCK_N below 16 takes a multiply-add
kernel instead (no tensor-core tile to fill), giving more, smaller programs to spread over
the SMs. The build times them per shape on the target GPU (sharding/autotune.py) and the
engine records which to use. The reference is F.linear.

Quantized engines use the same kernels: an int8 or fp8 (E4M3) weight is converted to x's dtype
in registers (exact: |w| <= 127, and E4M3 has fewer mantissa bits than bf16) and each output
column multiplied by its scale at the end, so the step reads one byte per weight instead of
dequantizing the whole matrix first. x stays unquantized: fp8 weights are then weight-only,
where at large batches _scaled_mm quantizes x too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_runtime.kernels import pdl
from dist_runtime.kernels.pdl import wait_for_inputs

MAX_ROWS = 16  # rows of x one program holds; larger batches use cuBLAS
CONFIGS = [  # (block_n, block_k, num_warps, num_stages), the candidates the build times
    (16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3),
]
ROW_CONFIGS = [(4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 4)]  # one row only: the multiply-add kernel


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                   HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None] * stride_xm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            x = tl.load(x_rows + kk[None, :], mask=(rm < M)[:, None], other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=(rn < N)[:, None], other=0.0)
        else:
            x = tl.load(x_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :], other=0.0)
        w = w.to(x.dtype)  # a quantized weight becomes x's dtype here; a no-op otherwise
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_SCALE:
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _row_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # summed over K once, after the loop
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            x = tl.load(x_ptr + kk)
            w = tl.load(w_rows + kk[None, :], mask=(rn < N)[:, None], other=0.0)
        else:
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=(rn < N)[:, None] & (kk < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_SCALE:
        y *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = 32,
                  block_k: int = 256, num_warps: int = 4, num_stages: int = 3,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x of at most MAX_ROWS rows (leading dims flattened); with a
    float32 `scale` per output row, `weight` is int8 or fp8 and the product is scaled before the bias."""
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias_and_scale = (bias if bias is not None else weight, scale if scale is not None else weight)
    flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                 EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=num_stages, **pdl.launch(x))
    if block_n < 16:
        if m != 1:
            raise ValueError(f"block_n {block_n} is the one-row kernel's; x has {m} rows")
        _row_kernel[(triton.cdiv(n, block_n),)](rows, weight, *bias_and_scale, out, n, k, weight.stride(0), **flags)
        return out.view(*x.shape[:-1], n)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        rows, weight, *bias_and_scale, out, m, n, k, rows.stride(0), weight.stride(0), out.stride(0), BLOCK_M=MAX_ROWS,
        IEEE=x.dtype == torch.float32, **flags)
    return out.view(*x.shape[:-1], n)
