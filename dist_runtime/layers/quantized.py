"""GEMMs with quantized weights (see dist_runtime/quantization.py): int8 weight-only, and fp8 (E4M3)
weights with activations scaled per token at run time, or per tensor with a calibrated scale,
each with the weight's float32 scale per output row; and int4 weight-only (dist_runtime/int4.py),
with scales and zero points per row and group. Each returns activations in x's dtype."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dist_runtime.errors import EngineError
from dist_runtime.int4 import NIBBLES, int4_linear_reference
from dist_runtime.quantization import FP8, Fp8Rows, dequantize_weight, quantize_fp8, quantize_rows_fp8


def check_device(dtype: torch.dtype, device: torch.device, kv_cache: bool = False) -> None:
    """Refuse a format this device cannot run, before any work starts: fp8 GEMMs need a GPU of
    compute capability 8.9+, or a CPU whose torch build runs _scaled_mm with a scale per row
    (2.13's does; slow, but the same E4M3 arithmetic, so fp8 engines run in CI and the accuracy
    of fp8 weights is measured there); so does an fp8 KV cache on a GPU (Triton's E4M3 casts),
    while the CPU reference runs one."""
    if dtype != FP8 or (kv_cache and device.type == "cpu"):
        return
    if device.type == "cpu" and not kv_cache and cpu_runs_fp8_gemms():
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = f"the CPU, under torch {torch.__version__} (2.13's CPU build runs fp8 GEMMs)"
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            where = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        what, instead = (("KV cache is", "--kv-cache-dtype auto") if kv_cache
                         else ("GEMMs are", "--dtype int8wo or bf16"))
        raise EngineError(f"this engine's {what} fp8 (E4M3), which needs an NVIDIA GPU of compute capability "
                          f"8.9 or newer (Ada, Hopper); this rank runs on {where}. Build it with {instead} for "
                          f"this hardware")


@functools.cache
def cpu_runs_fp8_gemms() -> bool:
    """Whether this torch build's CPU runs _scaled_mm with per-row scales, as fp8_linear calls it."""
    e4m3 = torch.zeros(16, 16).to(FP8)
    try:
        torch._scaled_mm(e4m3, e4m3.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def takes_fp8_rows(layer, rows: int) -> bool:
    """Whether `layer` (a linear layer, or None) multiplies `rows` rows by fp8 weights with
    _scaled_mm: then the kernel before it may hand it an Fp8Rows. Not where the engine's tuning
    picked the Triton kernel for that many rows, which reads x unquantized."""
    if layer is None or layer.weight.dtype != FP8:
        return False
    return layer.kernels is None or layer.kernels.gemm(rows, *layer.weight.shape) is None


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                g_idx: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W4A16 (dist_runtime/int4.py's layout): the Triton kernel on a GPU, the torch reference on
    the CPU. The group size is what the tables say: columns per group, or for a row-parallel
    slice under act-order, which keeps every group of the layer while holding 1/tp of its
    columns, the columns per group that makes their count add up (g_idx alone picks a
    column's group there)."""
    group_size = -(-qweight.shape[1] * NIBBLES // scales.shape[1])
    if x.is_cuda:
        from dist_runtime.kernels.w4a16 import w4a16_linear

        return w4a16_linear(x, qweight, scales, zeros, group_size, g_idx, bias)
    return int4_linear_reference(x, qweight, scales, zeros, group_size, g_idx, bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weight-only int8: dequantize to x's dtype (exact: |w| <= 127) and GEMM, scale after."""
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def quantize_input(rows: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows in E4M3, float32 scale [rows, 1]): per token, or the calibrated `input_scale` [1]
    for every row, past which a value saturates. _scaled_mm pairs a weight's per-row scales
    only with per-row activation scales, so the static one is repeated."""
    if input_scale is None:
        return quantize_rows_fp8(rows)
    return quantize_fp8(rows, input_scale), input_scale.expand(len(rows), 1).contiguous()


def fp8_input(rows: torch.Tensor, input_scale: torch.Tensor | None) -> Fp8Rows:
    """quantize_input's result, from one Triton kernel on a GPU."""
    if rows.is_cuda:
        from dist_runtime.kernels.fused import fp8_rows

        return fp8_rows(rows, input_scale)
    return Fp8Rows(*quantize_input(rows, input_scale), rows.dtype)


def fp8_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               fast_accumulate: bool = False) -> torch.Tensor:
    """W8A8: x quantized (unless it comes as Fp8Rows), then one _scaled_mm that applies both
    scales and adds the bias: inside the GEMM, but for a float32 output (_scaled_mm refuses a
    bias there). It accumulates in float32, or with `fast_accumulate` in the tensor cores' own
    narrower sums, promoted less often: faster at some shapes, a little less exact (the
    build's tuning picks it per shape and rows only where it was measurably faster), and
    a RuntimeError where cuBLAS has no such kernel (quantized_linear falls back)."""
    if not isinstance(x, Fp8Rows):
        rows = fp8_input(x.reshape(-1, x.shape[-1]), input_scale)
        out = fp8_linear(rows, weight, scale, bias=bias, fast_accumulate=fast_accumulate)
        return out.view(*x.shape[:-1], weight.shape[0])
    fused_bias = bias if x.dtype != torch.float32 else None
    out = torch._scaled_mm(x.values, weight.t(), scale_a=x.scale, scale_b=scale.view(1, -1), bias=fused_bias,
                           out_dtype=x.dtype, use_fast_accum=fast_accumulate)
    return out + bias if bias is not None and fused_bias is None else out


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear emulated in float32 on any device, the CPU too: the same E4M3 operands and scales."""
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_input(rows, input_scale)
    out = (xq.float() * x_scale) @ dequantize_weight(weight, scale).t()
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     input_scale: torch.Tensor | None = None, fast_accumulate: bool = False) -> torch.Tensor:
    if weight.dtype == FP8:
        try:
            return fp8_linear(x, weight, scale, input_scale, bias, fast_accumulate)
        except RuntimeError:
            if not fast_accumulate:
                raise
            # cuBLAS lacks a fast-accumulating kernel for some row counts (on an H200: 16 rows,
            # a bias, 16,384 inputs), and a step's rows may fall between the buckets tuned
            return fp8_linear(x, weight, scale, input_scale, bias)
    out = int8_linear(x, weight, scale)
    return out + bias if bias is not None else out
