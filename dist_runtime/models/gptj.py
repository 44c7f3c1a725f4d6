"""GPT-J: LayerNorm, partial interleaved rotary, attention and MLP in parallel on one norm."""

from __future__ import annotations

import torch
from torch import nn

from dist_runtime.config import ModelConfig
from dist_runtime.layers.activation import activate, activation
from dist_runtime.layers.attention import AttentionMetadata, PagedAttention
from dist_runtime.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from dist_runtime.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from dist_runtime.layers.norm import LayerNorm
from dist_runtime.layers.rotary import RotaryEmbedding
from dist_runtime.mapping import Mapping
from dist_runtime.models.base import CausalLM


class GPTJAttention(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, rotary: RotaryEmbedding, comm) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads,
                                          m.tp, m.tp_rank, bias=False)
        self.out_proj = RowParallelLinear(c.hidden_size, c.hidden_size, m.tp, m.tp_rank, False, comm,
                                          name="out_proj")
        self.rotary = rotary
        self.attn = PagedAttention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, c.head_dim,
                                   c.head_dim**-0.5)

    def partial(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(x))
        return self.out_proj.partial(self.attn(q, k, v, meta, self.rotary, positions))


class GPTJMLP(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, comm) -> None:
        super().__init__()
        self.fc_in = ColumnParallelLinear(c.hidden_size, c.intermediate_size, m.tp, m.tp_rank, True, name="fc_in")
        self.fc_out = RowParallelLinear(c.intermediate_size, c.hidden_size, m.tp, m.tp_rank, True, comm,
                                        name="fc_out")
        self.act = activation(c.hidden_act)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out.partial(activate(self.act, self.fc_in(x), next_layer=self.fc_out))


class GPTJBlock(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, rotary: RotaryEmbedding, comm) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(c.hidden_size, c.norm_eps)
        self.attn = GPTJAttention(c, m, rotary, comm)
        self.mlp = GPTJMLP(c, m, comm)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.ln_1(x, next_layers=(self.attn.qkv_proj, self.mlp.fc_in))
        # Attention and MLP read the same input, so their partial sums share one all-reduce.
        partial = self.attn.partial(h, positions, meta) + self.mlp.partial(h)
        return x + self.mlp.fc_out.finish(partial)


class GPTJTransformer(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, layers: range, comm) -> None:
        super().__init__()
        rotary = RotaryEmbedding(c.head_dim, c.rotary_dim, c.rope_theta, c.rope_scaling, interleaved=True)
        if m.is_first_stage:
            self.wte = VocabParallelEmbedding(c.vocab_size, c.hidden_size, m.tp, m.tp_rank, comm)
        self.h = nn.ModuleDict({str(i): GPTJBlock(c, m, rotary, comm) for i in layers})
        if m.is_last_stage:
            self.ln_f = LayerNorm(c.hidden_size, c.norm_eps)


class GPTJForCausalLM(CausalLM):
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    embed_weight = "transformer.wte.weight"

    def __init__(self, config: ModelConfig, mapping: Mapping, layers: range, comm=None) -> None:
        super().__init__(config, mapping, layers, comm)
        self.transformer = GPTJTransformer(config, mapping, layers, comm)
        if mapping.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, mapping.tp, mapping.tp_rank,
                                          comm, bias=True)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.transformer.wte(inputs) if self.mapping.is_first_stage else inputs
        for block in self.transformer.h.values():
            x = block(x, positions, meta)
        return self.transformer.ln_f(x) if self.mapping.is_last_stage else x
