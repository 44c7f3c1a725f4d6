"""Qwen3: Llama's layers with an RMSNorm over each query and key head (`q_norm`, `k_norm`,
weights of head_dim) before rotary, and an explicit head_dim (128, even where hidden size /
heads differs). `Qwen3Attention` is the block other Qwen3 models (the MoE ones) reuse."""

from __future__ import annotations

import torch

from dist_runtime.config import ModelConfig
from dist_runtime.layers.norm import RMSNorm, norm_heads
from dist_runtime.layers.rotary import RotaryEmbedding
from dist_runtime.mapping import Mapping
from dist_runtime.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, c: ModelConfig, m: Mapping, rotary: RotaryEmbedding, comm, layer: int) -> None:
        super().__init__(c, m, rotary, comm, layer)
        # One weight per head dimension, shared by every head: replicated on every TP rank
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed before rotary, which on a GPU is one kernel with the cache write."""
        q, k, v = super().qkv(x)
        return (*norm_heads(q, k, self.q_norm, self.k_norm), v)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention = Qwen3Attention
