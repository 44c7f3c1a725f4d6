"""Mixtral: Mistral's layers with every MLP a sparse mixture of experts (layers/moe.py): 8
SiLU-gated experts, the top 2 per token, their weights renormalised.

Parameters are named as transformers 5 names them in memory (`mlp.gate`, and
`mlp.experts.gate_up_proj` / `down_proj` holding every expert's weights stacked); the
checkpoint's are `block_sparse_moe.gate` and `block_sparse_moe.experts.{e}.w1 / w3 / w2`."""

from __future__ import annotations

from torch import nn

from dist_runtime.layers.moe import ExpertNames, SparseMoeBlock
from dist_runtime.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    expert_names = ExpertNames(gate="w1", up="w3", down="w2")
    checkpoint_block = "block_sparse_moe"  # the checkpoint's name for a layer's `mlp`

    def mlp(self, layer: int) -> nn.Module | None:
        """A sparse MoE block, but in the layers the config keeps dense (None: a LlamaMLP)."""
        c, moe = self.config, self.config.moe
        if layer in moe.dense_layers:
            return None
        return SparseMoeBlock(moe.num_experts, moe.top_k, moe.norm_topk_prob, c.hidden_size, moe.intermediate_size,
                              self.mapping, self.comm, self.expert_names)

    def checkpoint_names(self, name: str) -> list[str]:
        names = super().checkpoint_names(name)
        return [n.replace(".mlp.", f".{self.checkpoint_block}.") for n in names]
