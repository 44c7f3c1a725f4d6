"""GEMMs with quantized weights (see sharding/quantize.py): int8 weight-only, and fp8 (E4M3)
weights with activations scaled per token at run time. Each takes the weight's float32 scale
per output row and returns activations in x's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_runtime.errors import EngineError
from sharding.quantize import FP8, quantize_rows_fp8


def check_device(dtype: torch.dtype, device: torch.device, kv_cache: bool = False) -> None:
    """Refuse a format this device cannot run, before any work starts: fp8 GEMMs need a GPU of
    compute capability 8.9+; so does an fp8 KV cache on a GPU (Triton's E4M3 casts), while the
    CPU reference runs one."""
    if dtype != FP8 or (kv_cache and device.type == "cpu"):
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = "the CPU"
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            where = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        what, instead = (("KV cache is", "--kv-cache-dtype auto") if kv_cache
                         else ("GEMMs are", "--dtype int8wo or bf16"))
        raise EngineError(f"this engine's {what} fp8 (E4M3), which needs an NVIDIA GPU of compute capability "
                          f"8.9 or newer (Ada, Hopper); this rank runs on {where}. Build it with {instead} for "
                          f"this hardware")


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weight-only int8: dequantize to x's dtype (exact: |w| <= 127) and GEMM, scale after."""
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8: x quantized per token, one _scaled_mm that applies both scales (float32 accumulate)."""
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_rows_fp8(rows)
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    out = fp8_linear(x, weight, scale) if weight.dtype == FP8 else int8_linear(x, weight, scale)
    return out + bias if bias is not None else out
