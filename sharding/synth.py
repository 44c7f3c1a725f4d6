"""Write a Hugging Face-layout checkpoint with random weights, and a tokenizer for it.

Tensors are made and written one at a time (streamed), so an 8B checkpoint never sits in
memory twice. Weights are scaled so that activations keep unit size through the layers and
the logits spread widely: greedy picks are then far from ties, which makes token-for-token
comparisons between layouts meaningful.
"""

from __future__ import annotations

import json
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from dist_runtime.config import ModelConfig
from dist_runtime.layers.embedding import _VocabParallel
from dist_runtime.layers.moe import Router
from dist_runtime.layers.norm import LayerNorm, RMSNorm
from dist_runtime.models import checkpoint_layout
from sharding.checkpoint import INDEX, Checkpoint
from sharding.safetensors_writer import StreamingWriter, TensorSpec

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


CHUNK_ELEMENTS = 1 << 24  # float32 noise is drawn this many elements at a time
RANDOM_WEIGHTS = "random_weights.json"  # in place of the weights: the seed and device to draw them with


def random_tensor(name: str, shape: tuple[int, ...], module: torch.nn.Module, seed: int, dtype: torch.dtype,
                  device: str) -> torch.Tensor:
    """Seeded by (seed, name); drawn in row chunks straight into `dtype`, so a 1 GB embedding
    never exists in float32 as a whole."""
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=dtype, device=device)
    rows = max(1, CHUNK_ELEMENTS // max(1, out[0].numel())) if out.dim() > 1 else out.shape[0]
    for start in range(0, out.shape[0], rows):
        part = out[start:start + rows]
        part.copy_(_scale(name, module, torch.randn(part.shape, generator=gen, device=device), shape))
    return out.cpu()


def _scale(name: str, module: torch.nn.Module, noise: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if isinstance(module, (RMSNorm, LayerNorm)):
        # about 1 as stored; Gemma's apply 1 + w, about 2, which keeps each block's normed output
        # large beside the embedding in the residual stream (with tied embeddings, a stream that
        # is mostly the input's embedding makes every token predict itself)
        return (1.0 + 0.1 * noise) if name.endswith("weight") else 0.1 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    if isinstance(module, _VocabParallel) and "lm_head" not in name:
        # embedding rows: unit scale as looked up (after Gemma's sqrt(hidden) too), like the
        # normed hidden states they become
        return noise / getattr(module, "embed_scale", 1.0)
    if isinstance(module, Router):  # scores 4x apart: near-ties between experts would pick per layout
        return 4 * noise / shape[-1] ** 0.5
    return noise / shape[-1] ** 0.5


def write_checkpoint(hf_config: dict[str, Any], out: str | Path, seed: int = 0, dtype: str | None = None,
                     shard_bytes: int = 5 * 2**30, device: str = "cpu", progress: bool = True,
                     weights: bool = True) -> Path:
    """Write config.json, safetensors shards (with an index when more than one) and the tokenizer.
    Without `weights`, a note of the seed and device in their place (RandomCheckpoint)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = dict(hf_config)
    tokenizer = train_tokenizer(hf_config["vocab_size"], add_bos=hf_config["model_type"] != "gptj")
    hf_config.update(bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS))
    if dtype:
        hf_config["dtype" if "dtype" in hf_config else "torch_dtype"] = dtype
    config = ModelConfig.from_hf(hf_config)
    if not weights:
        (out / RANDOM_WEIGHTS).write_text(json.dumps({"seed": seed, "device": device}))
        (out / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_tokenizer(tokenizer, out)
        return out
    torch_dtype = getattr(torch, config.dtype)  # Hugging Face names dtypes as torch does
    specs = [(TensorSpec(name, shape, torch_dtype), module) for name, shape, module in checkpoint_layout(config)]
    shards = _group(specs, shard_bytes)
    total = sum(spec.nbytes for spec, _ in specs)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {out}", disable=not progress)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with StreamingWriter(out / file, [spec for spec, _ in shard], {"format": "pt"}) as writer:
            for spec, module in shard:
                writer.write(spec.name, random_tensor(spec.name, spec.shape, module, seed, torch_dtype, device))
                weight_map[spec.name] = file
                bar.update(spec.nbytes)
    bar.close()
    if len(shards) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_tokenizer(tokenizer, out)
    return out


class RandomCheckpoint(Checkpoint):
    """A checkpoint written without its weights (`synth --no-weights`): every tensor is drawn
    when the build reads it, as write_checkpoint would have drawn it (same seed, same device,
    the same bits). An engine of a model whose checkpoint would not fit beside it on disk (a
    61 GB Qwen3-30B-A3B in bf16 next to its engine, on a 64 GB disk) builds from it."""

    def __init__(self, path: str | Path) -> None:
        note = json.loads((Path(path) / RANDOM_WEIGHTS).read_text())
        self.seed, self.device = note["seed"], note["device"]
        super().__init__(path)

    def _weight_map(self) -> dict[str, str]:
        self._layout = {name: (shape, module) for name, shape, module in checkpoint_layout(self.config)}
        return dict.fromkeys(self._layout, RANDOM_WEIGHTS)

    def _read(self, name: str) -> torch.Tensor:
        shape, module = self._layout[name]
        return random_tensor(name, shape, module, self.seed, getattr(torch, self.config.dtype), self.device)

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._layout[name][0])


def open_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at `path`: its weights read from its files, or drawn (RandomCheckpoint)."""
    return RandomCheckpoint(path) if (Path(path) / RANDOM_WEIGHTS).is_file() else Checkpoint(path)


def _group(specs: list, shard_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for item in specs:
        if shards[-1] and size + item[0].nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[0].nbytes
    return shards


def train_tokenizer(vocab_size: int, add_bos: bool) -> Tokenizer:
    """A byte-level BPE trained on a page shipped with the package: any text encodes, and
    decoding is exact across multi-byte characters. Its vocabulary may be smaller than the
    model's; ids past it decode to nothing."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 4096), special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = resources.files("dist_runtime").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(), trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


# a plain role-tagged format, for the chat routes of random-weight checkpoints
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "model_max_length": 1 << 30, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
