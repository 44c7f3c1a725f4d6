"""Gemma 2 and Gemma 3 (text): Llama's blocks with Gemma's differences. Embeddings scaled by
sqrt(hidden_size); RMSNorm as x * (1 + w); a norm before and after both attention and the MLP,
so each block's output is normed before it joins the residual stream; a GELU (tanh)-gated MLP;
attention scaled by query_pre_attn_scalar**-0.5; local (sliding-window) and global layers in a
fixed pattern; tied embeddings. Gemma 2 soft-caps the attention scores; Gemma 3 norms each
query and key head before rotary instead, and gives its local layers a rotary base of their
own. Both may soft-cap the final logits. A multimodal Gemma 3 checkpoint's text model is read
from under its `language_model.` prefix."""

from __future__ import annotations

import torch
from torch import nn

from dist_runtime.config import ModelConfig
from dist_runtime.layers.attention import AttentionMetadata
from dist_runtime.layers.embedding import ParallelLMHead, ScaledEmbedding
from dist_runtime.layers.norm import GemmaRMSNorm
from dist_runtime.layers.rotary import RotaryEmbedding
from dist_runtime.mapping import Mapping
from dist_runtime.models.base import CausalLM
from dist_runtime.models.llama import LlamaAttention, LlamaMLP


class GemmaAttention(LlamaAttention):
    """Llama's, scaled and soft-capped as the config says; Gemma 3 norms each query and key head
    before rotary (one weight per head dimension, replicated on every TP rank)."""

    def __init__(self, c: ModelConfig, m: Mapping, rotary: RotaryEmbedding, comm, layer: int) -> None:
        super().__init__(c, m, rotary, comm, layer)
        self.q_norm = self.k_norm = None
        if c.model_type != "gemma2":
            self.q_norm = GemmaRMSNorm(c.head_dim, c.norm_eps)
            self.k_norm = GemmaRMSNorm(c.head_dim, c.norm_eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gemma 3's q and k normed before rotary, which on a GPU is one kernel with the cache write."""
        q, k, v = super().qkv(x)
        if self.q_norm is None:
            return q, k, v
        return self.q_norm(q), self.k_norm(k), v


class GemmaDecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, rotary: RotaryEmbedding, comm, layer: int) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = GemmaAttention(c, m, rotary, comm, layer)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)
        self.mlp = LlamaMLP(c, m, comm)  # gate and up fused, down; the activation is the config's
        self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it): their sum is the hidden state.
        Each block's partial sum is all-reduced, then post-normed, then added to the residual
        stream by the next norm (in one kernel with it on a GPU)."""
        qkv = self.self_attn.qkv_proj
        if residual is None:
            h, residual = self.input_layernorm(x, next_layer=qkv), x
        else:
            h, residual = self.input_layernorm(x, residual, next_layer=qkv)
        attn = self.post_attention_layernorm(self.self_attn.partial(h, positions, meta),
                                             unfinished_layer=self.self_attn.o_proj)
        h, residual = self.pre_feedforward_layernorm(attn, residual, next_layer=self.mlp.input_layer)
        return self.post_feedforward_layernorm(self.mlp.partial(h), unfinished_layer=self.mlp.output_layer), residual


class GemmaModel(nn.Module):
    def __init__(self, c: ModelConfig, m: Mapping, layers: range, comm) -> None:
        super().__init__()
        full = RotaryEmbedding(c.head_dim, c.rotary_dim, c.rope_theta, c.rope_scaling, interleaved=False)
        local = full if c.local_rope_theta is None else RotaryEmbedding(c.head_dim, c.rotary_dim, c.local_rope_theta,
                                                                        None, interleaved=False)
        if m.is_first_stage:
            self.embed_tokens = ScaledEmbedding(c.vocab_size, c.hidden_size, m.tp, m.tp_rank, comm,
                                                c.hidden_size**0.5)
        self.layers = nn.ModuleDict({
            str(i): GemmaDecoderLayer(c, m, local if c.layer_types[i] == "sliding_attention" else full, comm, i)
            for i in layers})
        if m.is_last_stage:
            self.norm = GemmaRMSNorm(c.hidden_size, c.norm_eps)


class GemmaForCausalLM(CausalLM):
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    embed_weight = "model.embed_tokens.weight"

    def __init__(self, config: ModelConfig, mapping: Mapping, layers: range, comm=None) -> None:
        super().__init__(config, mapping, layers, comm)
        self.model = GemmaModel(config, mapping, layers, comm)
        if mapping.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, mapping.tp, mapping.tp_rank, comm)
            if config.tie_word_embeddings and mapping.is_first_stage:
                self.lm_head.weight = self.model.embed_tokens.weight

    def checkpoint_names(self, name: str) -> list[str]:
        return [self.config.weight_prefix + piece for piece in super().checkpoint_names(name)]

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(inputs) if self.mapping.is_first_stage else inputs
        residual = None
        for layer in self.model.layers.values():
            x, residual = layer(x, residual, positions, meta)
        if residual is None:  # a stage without layers
            return self.model.norm(x) if self.mapping.is_last_stage else x
        if self.mapping.is_last_stage:
            return self.model.norm(x, residual)[0]
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Soft-capped, tanh(logits / cap) * cap, in float32 (transformers caps in the model's
        dtype; a bfloat16 tanh near +-1 would tie the top tokens that float32 keeps apart)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits.float() / cap) * cap
