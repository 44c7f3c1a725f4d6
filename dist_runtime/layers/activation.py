"""MLP activations."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dist_runtime.errors import CheckpointError
from dist_runtime.layers.quantized import takes_fp8_rows


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": gelu_tanh,  # activate() recognises it for the fused kernel
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,  # gated() recognises it for the fused kernel
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def gated(act: Callable[[torch.Tensor], torch.Tensor], gate_up: torch.Tensor, next_layer=None):
    """act(gate) * up over a fused [gate | up] tensor (SiLU-and-mul for Llama; one kernel on a
    GPU, which also quantizes the result when `next_layer`, the linear layer it goes to, has fp8
    weights)."""
    if gate_up.is_cuda and act is F.silu:
        from dist_runtime.kernels.fused import fp8_rows, silu_and_mul

        if takes_fp8_rows(next_layer, gate_up.numel() // gate_up.shape[-1]):
            return fp8_rows(gate_up.reshape(-1, gate_up.shape[-1]), next_layer.input_scale, act="silu_mul")
        return silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


def activate(act: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, next_layer=None):
    """act(x); on a GPU, GELU (tanh) comes quantized from one kernel when `next_layer`, the
    linear layer it goes to, has fp8 weights (GPT-J's fc_out)."""
    if x.is_cuda and act is gelu_tanh and takes_fp8_rows(next_layer, x.numel() // x.shape[-1]):
        from dist_runtime.kernels.fused import fp8_rows

        return fp8_rows(x.reshape(-1, x.shape[-1]), next_layer.input_scale, act="gelu_tanh")
    return act(x)
