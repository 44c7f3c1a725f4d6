"""Column-, QKV- and row-parallel linear layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_runtime.errors import PlanError
from dist_runtime.layers import declare, split, unsliced
from dist_runtime.layers.quantized import int4_linear, quantized_linear
from dist_runtime.quantization import Fp8Rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernels=None,
           scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
           zero: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the Triton kernel for a few rows where the engine's tuning found it faster
    for this shape on this GPU (`kernels`: the runner's KernelChoices, None on the CPU); with a
    `scale`, the weight is quantized (int8 or fp8, one scale per output row), and an fp8 one may
    come with a calibrated `input_scale`. The tuning's choices hold for quantized weights too,
    which the Triton kernel reads as they are: fp8 ones then multiply x unquantized (weight-only,
    for decode batches where reading the weight is the whole cost), while _scaled_mm quantizes x
    (or takes it quantized, an Fp8Rows) with `input_scale` or per token, accumulating fast
    where the tuning found that faster. With a `zero` (and maybe a `g_idx`), the weight is int4,
    packed (dist_runtime/int4.py), and takes its own kernel whatever the tuning chose."""
    if zero is not None:
        return int4_linear(x, weight, scale, zero, g_idx, bias)
    values = x.values if isinstance(x, Fp8Rows) else x
    rows = values.numel() // values.shape[-1]
    choice = None
    if kernels is not None and not isinstance(x, Fp8Rows):
        choice = kernels.gemm(rows, *weight.shape)
    if choice is None:
        if scale is None:
            return F.linear(x, weight, bias)
        fast_accumulate = kernels is not None and kernels.fast_accumulate(rows, *weight.shape)
        return quantized_linear(x, weight, scale, bias, input_scale, fast_accumulate)
    from dist_runtime.kernels.skinny_gemm import skinny_linear

    return skinny_linear(x, weight, bias, scale=scale, **choice)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split over TP ranks; the output stays split.

    `out_features` may list several pieces fused into one GEMM (gate and up); each piece is
    split on its own so that every rank holds its part of each. The checkpoint may hold the
    pieces as separate tensors (Llama) or already fused into one (Phi-3): the slicing cuts each
    piece out of either.
    """

    parallel = "column"

    def __init__(self, in_features: int, out_features: int | Sequence[int], tp: int, tp_rank: int,
                 bias: bool, name: str = "linear") -> None:
        super().__init__()
        pieces = [out_features] if isinstance(out_features, int) else list(out_features)
        self.tp, self.tp_rank = tp, tp_rank
        self.piece_sizes = pieces
        self.local_sizes = self.local_piece_sizes(pieces, name)
        out = sum(self.local_sizes)
        self.weight = declare(nn.Parameter(torch.empty(out, in_features)), self.parallel,
                              self._shard, linear=True)
        self.bias = declare(nn.Parameter(torch.empty(out)), self.parallel, self._shard) if bias else None
        self.kernels = None  # KernelChoices, set by a GPU runner
        self.weight_scale = None  # per output row (and group, int4), when the engine's weights are quantized
        self.input_scale = None  # per tensor, when an fp8 engine was calibrated
        self.weight_zero = self.g_idx = None  # int4: zero points per row and group; act-order's groups

    def local_piece_sizes(self, pieces: list[int], name: str) -> list[int]:
        for size in pieces:
            if size % self.tp:
                raise PlanError(f"{name}: output size {size} does not divide by tp={self.tp}")
        return [size // self.tp for size in pieces]

    def shard_piece(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        return split(tensor, 0, self.tp, self.tp_rank)

    def _shard(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if len(tensors) == 1 and len(self.piece_sizes) > 1:  # one checkpoint tensor holds every piece
            tensors = tensors[0].split(self.piece_sizes)
        return torch.cat([self.shard_piece(i, t) for i, t in enumerate(tensors)], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.kernels, self.weight_scale, self.input_scale, self.weight_zero,
                      self.g_idx)


def kv_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> range:
    """The KV heads (global indices) TP rank `tp_rank` holds: its share while there are at least
    as many heads as ranks, else the one head its query heads read (shared by tp // heads ranks)."""
    local, replicas = max(1, num_kv_heads // tp), max(1, tp // num_kv_heads)
    first = tp_rank // replicas * local
    return range(first, first + local)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM. Query heads split over TP ranks; KV heads split
    too while there are at least as many as ranks, and are replicated otherwise (each rank
    keeps the one KV head its query heads read)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, tp: int,
                 tp_rank: int, bias: bool) -> None:
        if num_heads % tp:
            raise PlanError(f"{num_heads} attention heads do not divide by tp={tp}")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise PlanError(f"{num_kv_heads} KV heads neither divide by tp={tp} nor divide it")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.kv_heads = kv_head_range(num_kv_heads, tp, tp_rank)
        self.num_kv_heads = len(self.kv_heads)
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         tp, tp_rank, bias, name="qkv_proj")

    def local_piece_sizes(self, pieces: list[int], name: str) -> list[int]:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return [q, kv, kv]

    def shard_piece(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return split(tensor, 0, self.tp, self.tp_rank)
        return tensor[self.kv_heads.start * self.head_dim: self.kv_heads.stop * self.head_dim]

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.split(self.local_sizes, dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over TP ranks: each rank's product is a
    partial sum, all-reduced over the TP group; the bias is added once, after the sum."""

    parallel = "row"

    def __init__(self, in_features: int, out_features: int, tp: int, tp_rank: int, bias: bool,
                 comm=None, name: str = "linear") -> None:
        super().__init__()
        if in_features % tp:
            raise PlanError(f"{name}: input size {in_features} does not divide by tp={tp}")
        self.tp, self.tp_rank, self.comm = tp, tp_rank, comm
        self.weight = declare(nn.Parameter(torch.empty(out_features, in_features // tp)), self.parallel,
                              lambda ts: split(unsliced(ts), 1, tp, tp_rank), linear=True)
        self.bias = declare(nn.Parameter(torch.empty(out_features)), "replicated", unsliced) if bias else None
        self.kernels = None  # KernelChoices, set by a GPU runner
        self.weight_scale = None  # per output row (and group, int4), when the engine's weights are quantized
        self.input_scale = None  # per tensor, when an fp8 engine was calibrated
        self.weight_zero = self.g_idx = None  # int4: zero points per row and group; act-order's groups

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the product, before the all-reduce and without the bias."""
        return linear(x, self.weight, None, self.kernels, self.weight_scale, self.input_scale, self.weight_zero,
                      self.g_idx)

    def finish(self, partial_sum: torch.Tensor) -> torch.Tensor:
        """All-reduce partial sums (several layers' may be summed first) and add the bias."""
        out = self.comm.all_reduce(partial_sum) if self.tp > 1 else partial_sum
        return out + self.bias if self.bias is not None else out

    def finish_add_rmsnorm(self, partial_sum: torch.Tensor, residual: torch.Tensor,
                           norm) -> tuple[torch.Tensor, torch.Tensor] | None:
        """finish(partial_sum), then `norm` (an RMSNorm) of it and `residual`, in one kernel where
        the communicator has one and no bias comes between; None otherwise."""
        if self.tp == 1 or self.bias is not None:
            return None
        return self.comm.all_reduce_add_rmsnorm(partial_sum, residual, norm.weight, norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.partial(x))
