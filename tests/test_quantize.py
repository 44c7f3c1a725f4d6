"""Quantization round trips stay within the format's bound, element by element."""

from __future__ import annotations

import pytest
import torch

from dist_runtime.quantization import (
    FP8,
    FP8_MAX,
    dequantize_kv,
    dequantize_weight,
    quantize_kv,
    quantize_rows_fp8,
    quantize_weight,
)


def weights() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(37, 129) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different ranges
    w[5] = 0  # an all-zero row
    w[7, 3] = 1e3  # one outlier dominates its row
    return w


def test_int8_round_trip_is_within_half_a_step_per_element():
    w = weights()
    q, scale = quantize_weight(w, "int8wo")
    assert q.dtype == torch.int8 and scale.shape == (37,) and q.abs().max() <= 127
    err = (dequantize_weight(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (dequantize_weight(q, scale)[5] == 0).all()


def test_fp8_round_trip_is_within_e4m3_precision():
    w = weights()
    q, scale = quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (37,)
    err = (dequantize_weight(q, scale) - w).abs()
    # 3 mantissa bits: half a unit is 2^-4 of the value; below E4M3's normal range, 2^-10 of the scale
    assert (err <= torch.maximum(w.abs() / 16, scale[:, None] * 2.0**-10) + 1e-9).all()
    assert dequantize_weight(q, scale).abs().amax(dim=1)[7] == pytest.approx(1e3, rel=1e-6)


def test_fp8_activation_rows_scale_to_the_format_limit():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1, 10, 100, 0])[:, None]
    q, scale = quantize_rows_fp8(x)
    assert scale.shape == (5, 1)
    assert q[:4].float().abs().amax(dim=1).tolist() == [FP8_MAX] * 4
    assert ((q.float() * scale - x).abs() <= x.abs() / 16 + scale * 2.0**-10).all()


def test_fp8_kv_round_trip_is_within_e4m3_precision_per_kv_head():
    torch.manual_seed(0)
    x = torch.randn(33, 3, 16) * torch.tensor([1e-2, 1.0, 50.0])[:, None]  # [tokens, kv_heads, head_dim]
    scale = x.abs().amax(dim=(0, 2)) / FP8_MAX
    q = quantize_kv(x, scale)
    assert q.dtype == FP8 and q.shape == x.shape
    err = (dequantize_kv(q, scale, torch.float32) - x).abs()
    assert (err <= x.abs() / 16 + scale[:, None] * 2.0**-10).all()
    # a scale too small for the values saturates them at 448 scales instead of overflowing to NaN
    small = scale / 2
    assert dequantize_kv(quantize_kv(x, small), small, torch.float32).abs().amax(dim=(0, 2)).tolist() == \
        pytest.approx((small * FP8_MAX).tolist())


def test_unknown_format_is_refused_by_name():
    with pytest.raises(ValueError, match="int4"):
        quantize_weight(torch.ones(2, 2), "int4")
