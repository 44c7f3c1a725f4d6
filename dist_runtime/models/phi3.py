"""Phi-3: Llama's layers, with q, k and v (and gate and up) already fused in the checkpoint:
`self_attn.qkv_proj` and `mlp.gate_up_proj` are read whole, and each fused layer cuts every
rank's part of each piece out of them (layers/linear.py ColumnParallelLinear). Partial rotary
and sliding windows come from the config."""

from __future__ import annotations

from dist_runtime.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed = {}  # the checkpoint's names are ours: nothing to gather from separate tensors
