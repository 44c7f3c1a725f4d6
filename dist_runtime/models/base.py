"""What every model file shares: one PP stage of a causal LM, and the names of the
checkpoint tensors each of its parameters is cut from."""

from __future__ import annotations

import torch
from torch import nn

from dist_runtime.config import ModelConfig
from dist_runtime.layers.attention import PagedAttention
from dist_runtime.mapping import Mapping


class CausalLM(nn.Module):
    """One PP stage: the embedding on the first stage, `layers` (global indices), and the
    final norm and LM head on the last. Parameter names are the Hugging Face ones, but for
    the fused layers named in `packed`.

    A model file's `forward(inputs, positions, meta)` takes token ids (first stage) or hidden
    states (later stages) and returns hidden states, final-normed on the last stage."""

    packed: dict[str, tuple[str, ...]] = {}  # fused module name -> checkpoint module names, in order
    embed_weight: str  # checkpoint name of the input embedding, source of a tied LM head

    def __init__(self, config: ModelConfig, mapping: Mapping, layers: range, comm=None) -> None:
        super().__init__()
        self.config, self.mapping, self.layer_range, self.comm = config, mapping, layers, comm

    def checkpoint_names(self, name: str) -> list[str]:
        """The checkpoint tensors that parameter `name` is made of (a module may name them
        itself: `checkpoint_sources`, as the stacked experts do)."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return [self.embed_weight]
        module_name, _, param_name = name.rpartition(".")
        sources = getattr(self.get_submodule(module_name), "checkpoint_sources", None)
        if sources is not None:
            return [f"{module_name}.{source}" for source, _ in sources(param_name)]
        for fused, pieces in self.packed.items():
            if f".{fused}." in name:
                return [name.replace(f".{fused}.", f".{piece}.") for piece in pieces]
        return [name]

    def attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] in the model's dtype. Their argmax is float32's (the conversion is exact),
        so a greedy decode graph takes it without writing a float32 copy (0.4 ms of a 23.6 ms
        Llama-3-8B step at batch 1024); sampling converts."""
        return self.lm_head(hidden)
