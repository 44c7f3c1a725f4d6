"""Normalisations, computed in float32 as the Hugging Face models do."""

import torch
import torch.nn.functional as F
from torch import nn

from dist_runtime.layers import declare, whole
from dist_runtime.layers.quantized import feeds_fp8


class RMSNorm(nn.Module):
    """RMSNorm, optionally of (x + residual): then it also returns the sum, the next residual.
    One fused kernel on a GPU."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = declare(nn.Parameter(torch.empty(size)), "replicated", whole)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, feeds=None, owed=None):
        """`feeds`: the linear layer the output goes to; on a GPU, one with fp8 weights gets
        its input quantized in the same kernel (an Fp8Rows). `owed`: the row-parallel layer
        whose all-reduce x, a partial sum, still needs; on GPUs it joins this kernel where the
        communicator can (see RowParallelLinear.finish_add_rmsnorm)."""
        if not x.is_cuda:
            return self.reference(owed.finish(x) if owed is not None else x, residual)
        from dist_runtime.kernels.fused import add_rmsnorm

        fp8 = feeds_fp8(feeds, x.numel() // x.shape[-1])
        if residual is not None:
            residual = residual.contiguous()
        if owed is not None:
            fused = None if residual is None or fp8 else owed.finish_add_rmsnorm(x, residual, self)
            if fused is not None:
                return fused
            x = owed.finish(x)
        input_scale = feeds.input_scale if fp8 else None
        if residual is None:
            return add_rmsnorm(x, self.weight, self.eps, fp8=fp8, input_scale=input_scale)
        return add_rmsnorm(x, self.weight, self.eps, residual, fp8, input_scale), residual

    def reference(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = residual = x + residual
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(x.dtype)
        return out if residual is None else (out, residual)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = declare(nn.Parameter(torch.empty(size)), "replicated", whole)
        self.bias = declare(nn.Parameter(torch.empty(size)), "replicated", whole)

    def forward(self, x: torch.Tensor, feeds: tuple = ()):
        """`feeds`: the linear layers the output goes to (GPT-J: qkv_proj and fc_in, the same
        input); on a GPU, when every one has fp8 weights, they get it quantized in the same
        kernel, one Fp8Rows for all (a calibrated scale is the same for each: same input)."""
        if x.is_cuda:
            from dist_runtime.kernels.fused import layernorm

            rows = x.numel() // x.shape[-1]
            fp8 = bool(feeds) and all(feeds_fp8(layer, rows) for layer in feeds)
            return layernorm(x, self.weight, self.bias, self.eps, fp8, feeds[0].input_scale if fp8 else None)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
