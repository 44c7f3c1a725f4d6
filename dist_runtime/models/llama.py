"""Llama 2 / 3 / 3.1, Mistral and Qwen2 / 2.5: RMSNorm, rotary (rotate-half), GQA, SiLU-gated MLP;
Qwen2's bias on q, k and v (not o_proj) and per-layer sliding windows come from the config."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dist_runtime.config import ModelConfig
from dist_runtime.layers.activation import activation, gated
from dist_runtime.layers.attention import AttentionMetadata, PagedAttention
from dist_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from dist_runtime.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from dist_runtime.layers.norm import RMSNorm
from dist_runtime.layers.rotary import RotaryEmbedding
from dist_runtime.mapping import Mapping
from dist_runtime.models.base import CausalLM


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, rotary: RotaryEmbedding, comm, layer: int) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads,
                                          m.tp, m.tp_rank, c.qkv_bias)
        self.o_proj = RowParallelLinear(c.num_heads * c.head_dim, c.hidden_size, m.tp, m.tp_rank,
                                        c.o_proj_bias, comm, name="o_proj")
        self.rotary = rotary
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, c.head_dim,
                                   c.attention_scale, c.window_of(layer), c.attn_logit_softcapping)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim], before rotary."""
        return self.qkv_proj.split_qkv(self.qkv_proj(x))

    def partial(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """This rank's share of the output, before o_proj's all-reduce."""
        q, k, v = self.qkv(x)
        return self.o_proj.partial(self.attn(q, k, v, meta, self.rotary, positions))


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, comm) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(c.hidden_size, [c.intermediate_size] * 2, m.tp, m.tp_rank,
                                                 c.mlp_bias, name="gate_up_proj")
        self.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, m.tp, m.tp_rank, c.mlp_bias,
                                           comm, name="down_proj")
        self.act = activation(c.hidden_act)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output, before down_proj's all-reduce."""
        return self.down_proj.partial(gated(self.act, self.gate_up_proj(x), next_layer=self.down_proj))

    @property
    def input_layer(self) -> ColumnParallelLinear:
        """The GEMM the input goes to (a norm before it may hand it fp8 rows)."""
        return self.gate_up_proj

    @property
    def output_layer(self) -> RowParallelLinear:
        """The layer whose all-reduce the partial output still needs."""
        return self.down_proj


class LlamaDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, rotary: RotaryEmbedding, comm, layer: int,
                 attention: type[LlamaAttention] = LlamaAttention, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = attention(c, m, rotary, comm, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = mlp or LlamaMLP(c, m, comm)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata, unfinished_layer=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it): their sum is the hidden state.
        Outputs are partial sums, still owed their all-reduce (x's by `unfinished_layer`, the
        previous layer's down_proj): each norm all-reduces them and adds the residual first, in
        one kernel on GPUs where the communicator can."""
        qkv, gate_up = self.self_attn.qkv_proj, self.mlp.input_layer
        if residual is None:
            h, residual = self.input_layernorm(x, next_layer=qkv), x
        else:
            h, residual = self.input_layernorm(x, residual, next_layer=qkv, unfinished_layer=unfinished_layer)
        h, residual = self.post_attention_layernorm(self.self_attn.partial(h, positions, meta), residual,
                                                    next_layer=gate_up, unfinished_layer=self.self_attn.o_proj)
        return self.mlp.partial(h), residual


class LlamaModel(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, layers: range, comm,
                 attention: type[LlamaAttention] = LlamaAttention,
                 mlp: Callable[[int], nn.Module | None] | None = None) -> None:
        super().__init__()
        rotary = RotaryEmbedding(c.head_dim, c.rotary_dim, c.rope_theta, c.rope_scaling, interleaved=False)
        if m.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, m.tp, m.tp_rank, comm)
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(c, m, rotary, comm, i, attention, mlp and mlp(i))
                                     for i in layers})
        if m.is_last_stage:
            self.norm = RMSNorm(c.hidden_size, c.norm_eps)


class LlamaForCausalLM(CausalLM):
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    embed_weight = "model.embed_tokens.weight"
    attention: type[LlamaAttention] = LlamaAttention  # the families that differ only there swap it

    def mlp(self, layer: int) -> nn.Module | None:
        """Layer `layer`'s MLP, in place of LlamaMLP (None: LlamaMLP); the mixtures of experts swap it."""
        return None

    def __init__(self, config: ModelConfig, mapping: Mapping, layers: range, comm=None) -> None:
        super().__init__(config, mapping, layers, comm)
        self.model = LlamaModel(config, mapping, layers, comm, self.attention, self.mlp)
        if mapping.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, mapping.tp, mapping.tp_rank, comm)
            if config.tie_word_embeddings and mapping.is_first_stage:
                self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(inputs) if self.mapping.is_first_stage else inputs
        residual = unfinished_layer = None
        for layer in self.model.layers.values():
            x, residual = layer(x, residual, positions, meta, unfinished_layer)
            unfinished_layer = layer.mlp.output_layer
        if residual is None:  # a stage without layers
            return self.model.norm(x) if self.mapping.is_last_stage else x
        if self.mapping.is_last_stage:
            return self.model.norm(x, residual, unfinished_layer=unfinished_layer)[0]
        return unfinished_layer.finish(x) + residual
