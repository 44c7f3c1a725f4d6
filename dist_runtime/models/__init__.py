"""Model files by architecture, and the one way to build a rank's stage of a model."""

from __future__ import annotations

import torch

from dist_runtime.config import ModelConfig
from dist_runtime.mapping import Mapping
from dist_runtime.models.base import CausalLM
from dist_runtime.models.gemma import GemmaForCausalLM
from dist_runtime.models.gptj import GPTJForCausalLM
from dist_runtime.models.llama import LlamaForCausalLM
from dist_runtime.models.mixtral import MixtralForCausalLM
from dist_runtime.models.phi3 import Phi3ForCausalLM
from dist_runtime.models.qwen3 import Qwen3ForCausalLM
from dist_runtime.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[CausalLM]] = {"llama": LlamaForCausalLM, "qwen3": Qwen3ForCausalLM, "phi3": Phi3ForCausalLM,
                                     "mixtral": MixtralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM,
                                     "gemma": GemmaForCausalLM, "gptj": GPTJForCausalLM}


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
    return [(name, shape, module) for name, shape, module, _, _ in _sources(config)]


def stacked_sources(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """Checkpoint tensor -> (our parameter made of it, its place among that parameter's n
    sources, n). A checkpoint may hold the parameter itself under our name instead, its sources
    stacked in that order: transformers 5 can save experts that way, one [experts, 2 x inter,
    hidden] tensor for every expert's gate and up rows and one for the down projections."""
    return {name: (param, index, count) for name, _, _, param, (index, count) in _sources(config)}


def _sources(config: ModelConfig):
    """(checkpoint name, shape, our module, our parameter, (index, count) among its sources)."""
    model = build_model(config, Mapping(), range(config.num_layers), torch.float32)
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}"
            names = model.checkpoint_names(full_name)
            if hasattr(module, "checkpoint_sources"):
                shapes = [shape for _, shape in module.checkpoint_sources(param_name)]
            else:
                rows = getattr(module, "local_sizes", [param.shape[0]]) if len(names) > 1 else [param.shape[0]]
                shapes = [(size, *param.shape[1:]) for size in rows]
            for index, (name, shape) in enumerate(zip(names, shapes)):
                if name not in seen:
                    seen.add(name)
                    yield name, shape, module, full_name, (index, len(names))
