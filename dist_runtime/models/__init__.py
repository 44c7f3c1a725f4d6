"""Model files by architecture, and the one way to build a rank's stage of a model."""

from __future__ import annotations

import torch

from dist_runtime.config import ModelConfig
from dist_runtime.mapping import Mapping
from dist_runtime.models.base import CausalLM
from dist_runtime.models.gptj import GPTJForCausalLM
from dist_runtime.models.llama import LlamaForCausalLM
from dist_runtime.models.phi3 import Phi3ForCausalLM
from dist_runtime.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[CausalLM]] = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM, "phi3": Phi3ForCausalLM,
                                     "gptj": GPTJForCausalLM}


def build_model(config: ModelConfig, mapping: Mapping, layers: range, dtype: torch.dtype,
                device: str | torch.device = "meta", comm=None) -> CausalLM:
    """A rank's stage with uninitialised weights; on the meta device it costs no memory,
    which is how the planner and builder read shapes and slicing rules."""
    with torch.device(device):
        model = MODELS[config.architecture](config, mapping, layers, comm)
    # Parameters only: buffers such as rotary frequencies stay float32.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.requires_grad_(False)


def checkpoint_layout(config: ModelConfig) -> list[tuple[str, tuple[int, ...], torch.nn.Module]]:
    """Every tensor a Hugging Face checkpoint of this model holds: (name, shape, the module
    of ours it feeds). Read off the model definition at tp=1, so it cannot drift from it."""
    model = build_model(config, Mapping(), range(config.num_layers), torch.float32)
    layout: dict[str, tuple[tuple[int, ...], torch.nn.Module]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            names = model.checkpoint_names(f"{module_name}.{param_name}")
            rows = getattr(module, "local_sizes", [param.shape[0]]) if len(names) > 1 else [param.shape[0]]
            for name, size in zip(names, rows):
                layout.setdefault(name, ((size, *param.shape[1:]), module))
    return [(name, shape, module) for name, (shape, module) in layout.items()]
