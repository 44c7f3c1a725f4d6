"""Normalisations, computed in float32 as the Hugging Face models do."""

import torch
import torch.nn.functional as F
from torch import nn

from dist_runtime.layers import declare, unsliced
from dist_runtime.layers.quantized import takes_fp8_rows


class RMSNorm(nn.Module):
    """RMSNorm, optionally of (x + residual): then it also returns the sum, the next residual.
    One fused kernel on a GPU."""

    plus_one = False  # Gemma's weights, applied as 1 + w (GemmaRMSNorm)

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = declare(nn.Parameter(torch.empty(size)), "replicated", unsliced)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, next_layer=None, unfinished_layer=None):
        """`next_layer`: the linear layer the output goes to; on a GPU, one with fp8 weights gets
        its input quantized in the same kernel (an Fp8Rows). `unfinished_layer`: the row-parallel
        layer whose all-reduce x, a partial sum, still needs; on GPUs it joins this kernel where the
        communicator can (see RowParallelLinear.finish_add_rmsnorm)."""
        if not x.is_cuda:
            return self.reference(unfinished_layer.finish(x) if unfinished_layer is not None else x, residual)
        from dist_runtime.kernels.fused import add_rmsnorm

        fp8 = takes_fp8_rows(next_layer, x.numel() // x.shape[-1])
        if residual is not None:
            residual = residual.contiguous()
        if unfinished_layer is not None:
            # the communicator's kernel writes neither fp8 rows nor Gemma's 1 + w
            joinable = residual is not None and not fp8 and not self.plus_one
            fused_output = unfinished_layer.finish_add_rmsnorm(x, residual, self) if joinable else None
            if fused_output is not None:
                return fused_output
            x = unfinished_layer.finish(x)
        input_scale = next_layer.input_scale if fp8 else None
        if residual is None:
            return add_rmsnorm(x, self.weight, self.eps, fp8=fp8, input_scale=input_scale, plus_one=self.plus_one)
        return add_rmsnorm(x, self.weight, self.eps, residual, fp8, input_scale, self.plus_one), residual

    def reference(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = residual = x + residual
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(x.dtype)
        return out if residual is None else (out, residual)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as its offset from 1 and applied as x * (1 + w), in
    float32 before the one rounding (Llama's rounds first, then multiplies)."""

    plus_one = True

    def reference(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = residual = x + residual
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (normed * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)


def norm_heads(q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim], each head RMS-normed by
    `q_norm` or `k_norm` (weights of head_dim: Qwen3). On a GPU one kernel does both in place:
    they are views into the qkv GEMM's output, which nothing else reads."""
    if q.is_cuda:
        from dist_runtime.kernels.fused import qk_norm_

        return qk_norm_(q, k, q_norm.weight, k_norm.weight, q_norm.eps, k_norm.eps)
    return q_norm.reference(q), k_norm.reference(k)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = declare(nn.Parameter(torch.empty(size)), "replicated", unsliced)
        self.bias = declare(nn.Parameter(torch.empty(size)), "replicated", unsliced)

    def forward(self, x: torch.Tensor, next_layers: tuple = ()):
        """`next_layers`: the linear layers the output goes to (GPT-J: qkv_proj and fc_in, the same
        input); on a GPU, when every one has fp8 weights, they get it quantized in the same
        kernel, one Fp8Rows for all (a calibrated scale is the same for each: same input)."""
        if x.is_cuda:
            from dist_runtime.kernels.fused import layernorm

            rows = x.numel() // x.shape[-1]
            fp8 = bool(next_layers) and all(takes_fp8_rows(layer, rows) for layer in next_layers)
            return layernorm(x, self.weight, self.bias, self.eps, fp8, next_layers[0].input_scale if fp8 else None)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
