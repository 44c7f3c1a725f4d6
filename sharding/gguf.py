"""A GGUF file (llama.cpp's format) to a Hugging Face checkpoint folder: transformers reads
and dequantizes the file, and its float32 weights, config, generation config and tokenizer
(with its chat template) are written as an ordinary safetensors folder that `build`, `serve`
and transformers itself read. Needs the `gguf` extra (transformers, gguf, accelerate)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_runtime.errors import CheckpointError


def convert(gguf_file: str | Path, out: str | Path) -> Path:
    """Write the checkpoint folder `out` from `gguf_file`; returns `out`."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise CheckpointError(f"reading GGUF needs transformers, gguf and accelerate: "
                              f"pip install 'dist-runtime[gguf]' ({e})") from e
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: no such file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{gguf_file}: transformers cannot read it ({e})") from e
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:  # one tensor, saved once (safetensors refuses shared storage)
        weights.pop("lm_head.weight", None)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # the weights are dequantized now: the file's quantization no longer describes them
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
