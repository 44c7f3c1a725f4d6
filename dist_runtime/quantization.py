"""Weight quantization at build time, one scale per output channel, stored beside the weight
as `<name>_scale` (float32). The runtime multiplies the scale back after the GEMM, so a row of
the weight and its scale always travel together (column-parallel slices cut both alike).
Also the fp8 casts of activations (per token, or per tensor with a calibrated scale) and of the
KV cache (one static scale per KV head)."""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
INT8_MAX = 127
QUANTIZED_DTYPES = {"fp8": FP8, "int8wo": torch.int8}
SCALE_SUFFIX = "_scale"
INPUT_SCALE = "input_scale"  # a calibrated GEMM input scale, `<layer>.input_scale` beside `<layer>.weight`
# W4A16 engines (dist_runtime/int4.py's layout), by the dtype of their activations: bf16, fp16, float32
INT4_DTYPES = {"int4": torch.bfloat16, "int4-fp16": torch.float16, "int4-fp32": torch.float32}
ZERO_SUFFIX = "_zero"  # an int4 weight's zero points, `<name>_zero` beside its `<name>_scale`
G_IDX = "g_idx"  # an int4 weight's group of each input column (act-order), `<layer>.g_idx`
# Without calibration (as vLLM): keys and values of real models sit well inside E4M3's +-448.
DEFAULT_KV_SCALE = 1.0


def scales_for(amax: torch.Tensor, limit: float = FP8_MAX) -> torch.Tensor:
    """Each largest magnitude maps to `limit` (an all-zero one gets scale 1). Times the float32
    reciprocal, as torch divides by a number on a GPU and the fused kernels do, so that every
    path gets the same bits: with bf16 inputs many values land exactly between two E4M3 values,
    and the scale's last bit decides which way they round."""
    return torch.where(amax > 0, amax * (1.0 / limit), torch.ones_like(amax))


def channel_scales(weight: torch.Tensor, limit: float) -> torch.Tensor:
    """Per output row: the largest magnitude maps to `limit`."""
    return scales_for(weight.float().abs().amax(dim=1), limit)


def input_scale_name(weight_name: str) -> str:
    """`<layer>.input_scale` beside `<layer>.weight`."""
    return weight_name.removesuffix("weight") + INPUT_SCALE


def g_idx_name(weight_name: str) -> str:
    """`<layer>.g_idx` beside `<layer>.weight`."""
    return weight_name.removesuffix("weight") + G_IDX


def int4_table_dtype(activations: torch.dtype) -> torch.dtype:
    """The dtype of an int4 engine's scales and zero points: its activations' where they hold
    every scale of a float16 checkpoint exactly (float16, float32), else float32."""
    return activations if activations in (torch.float16, torch.float32) else torch.float32


def quantize_weight(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized weight, float32 scale per output row) for fmt "int8wo" or "fp8"; stacked weights
    (a mixture's experts, [experts, out, in]) get one per row of each, [experts, out]."""
    if weight.dim() > 2:
        q, scale = quantize_weight(weight.reshape(-1, weight.shape[-1]), fmt)
        return q.view(weight.shape), scale.view(weight.shape[:-1])
    if fmt == "int8wo":
        scale = channel_scales(weight, INT8_MAX)
        q = torch.round(weight.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    elif fmt == "fp8":
        scale = channel_scales(weight, FP8_MAX)
        q = quantize_fp8(weight, scale[:, None])
    else:
        raise ValueError(f"unknown quantized format {fmt!r}; known: {sorted(QUANTIZED_DTYPES)}")
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation scaling: (x in E4M3, float32 scale [rows, 1])."""
    scale = scales_for(x.float().abs().amax(dim=-1, keepdim=True))
    return quantize_fp8(x, scale), scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in E4M3 (the float32 scale broadcast over x), saturated at +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class Fp8Rows(NamedTuple):
    """A GEMM input already quantized for fp8_linear (on a GPU, by the kernel before it:
    RMSNorm or SiLU-and-mul), so that the GEMM does not quantize it in a pass of its own."""
    values: torch.Tensor  # [tokens, n] E4M3
    scale: torch.Tensor  # [tokens, 1] float32
    dtype: torch.dtype  # of the activations before quantization, and of the GEMM's output


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Keys or values [tokens, kv_heads, head_dim] to E4M3, one float32 scale per KV head."""
    return quantize_fp8(x, scale[:, None])


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)
