"""Qwen3-MoE: Qwen3's attention (q and k normed per head) and Mixtral's sparse MoE blocks, with
their own choices: 128 experts of moe_intermediate_size, 8 per token, renormalised only when
norm_topk_prob says so, and dense MLPs in the layers of mlp_only_layers or between every
decoder_sparse_step-th. Checkpoint names are `mlp.gate` and `mlp.experts.{e}.gate_proj / up_proj
/ down_proj`."""

from __future__ import annotations

from dist_runtime.layers.moe import ExpertNames
from dist_runtime.models.mixtral import MixtralForCausalLM
from dist_runtime.models.qwen3 import Qwen3Attention


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    attention = Qwen3Attention
    expert_names = ExpertNames(gate="gate_proj", up="up_proj", down="down_proj")
    checkpoint_block = "mlp"
