"""Parallel building blocks. Each parameter carries how its TP slice is cut from the checkpoint:

- `param.parallel`: "column", "row", "vocab" or "replicated", or for a mixture's stacked experts
  "expert-column" / "expert-row" (read by the planner);
- `param.shard_of(tensors)`: this rank's slice, given the full checkpoint tensors it is made
  of (several when the layer fuses, e.g. q, k, v), read by the builder.
"""

from collections.abc import Callable

import torch
from torch import nn

ShardFn = Callable[[list[torch.Tensor]], torch.Tensor]


def declare(param: nn.Parameter, parallel: str, shard_of: ShardFn, linear: bool = False) -> nn.Parameter:
    """Attach the slicing rule to a parameter; `linear` marks GEMM weights that quantization may change."""
    param.parallel = parallel
    param.shard_of = shard_of
    param.is_linear_weight = linear
    return param


def unsliced(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The replicated rule: one source tensor, taken as it is."""
    (tensor,) = tensors
    return tensor


def split(tensor: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    size = tensor.shape[dim] // parts
    return tensor.narrow(dim, index * size, size)
