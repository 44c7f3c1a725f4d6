"""Calibration for static fp8 scales. A text, tokenized with the checkpoint's tokenizer, runs in
chunks of up to the engine's sequence length through the float32 torch reference of the whole
model on this CPU; kept are the largest magnitudes of every GEMM's input (one per tensor) and,
per layer and KV head, of the keys (rotated, as cached) and values; their scales map these to
E4M3's 448. The reference holds the model in float32: 4 bytes per parameter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from dist_runtime.errors import CalibrationError
from dist_runtime.layers.attention import AttentionMetadata
from dist_runtime.mapping import Mapping
from dist_runtime.models import build_model
from dist_runtime.models.base import CausalLM
from dist_runtime.quantization import scales_for
from dist_runtime.tokenizer import Tokenizer
from sharding.checkpoint import Checkpoint


@dataclasses.dataclass
class Ranges:
    inputs: dict[str, float]  # GEMM weight name -> largest |input|
    keys: torch.Tensor  # [layers, kv_heads] largest |key|
    values: torch.Tensor  # [layers, kv_heads] largest |value|
    tokens: int

    def input_scales(self) -> dict[str, torch.Tensor]:
        """GEMM weight name -> its input's static scale, float32 [1]."""
        return {name: scales_for(torch.tensor([amax])) for name, amax in self.inputs.items()}

    def kv_scales(self) -> dict[str, list[list[float]]]:
        """{"k": [layer][kv head], "v": the same}, as engine.json keeps them."""
        return {"k": scales_for(self.keys).tolist(), "v": scales_for(self.values).tolist()}


class _GemmInputs(TorchFunctionMode):
    """The largest |input| of every F.linear on one of the weights `names` knows: every GEMM of
    our layers, however a model calls them (GPT-J sums row-parallel partials itself)."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names, self.amax = names, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and id(args[1]) in self.names:
            name = self.names[id(args[1])]
            self.amax[name] = max(self.amax.get(name, 0.0), args[0].abs().max().item())
        return func(*args, **(kwargs or {}))


def reference_model(ck: Checkpoint) -> CausalLM:
    """The whole model (tp = pp = 1) in float32 on the CPU, its weights read from the checkpoint."""
    model = build_model(ck.config, Mapping(), range(ck.config.num_layers), torch.float32, device="cpu")
    for name, param in model.named_parameters():
        param.data = param.shard_of([ck.get(n) for n in model.checkpoint_names(name)]).float()
    return model


def read_tokens(ck: Checkpoint, text_file: str | Path) -> list[int]:
    path = Path(text_file)
    if not path.is_file():
        raise CalibrationError(f"calibration text {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"calibration text {path}: empty; calibration needs text to run through the model")
    if not (ck.path / "tokenizer.json").is_file():
        raise CalibrationError(f"calibration text {path}: the checkpoint {ck.path} has no tokenizer.json to read it")
    return Tokenizer(ck.path).encode(text)


def calibrate(ck: Checkpoint, text_file: str | Path, chunk_len: int, block_size: int = 16,
              progress: bool = True) -> Ranges:
    """The ranges seen over the text, in chunks of up to `chunk_len` tokens, each a sequence of
    its own; `progress` shows a bar on stderr."""
    ids = read_tokens(ck, text_file)
    model = reference_model(ck)
    attention = model.attention_layers()
    blocks = -(-chunk_len // block_size)
    for attn in attention:
        attn.k_cache = torch.zeros(blocks, block_size, attn.num_kv_heads, attn.head_dim)
        attn.v_cache = torch.zeros_like(attn.k_cache)
    keys, values = torch.zeros(2, len(attention), ck.config.num_kv_heads)
    gemms = _GemmInputs({id(p): name for name, p in model.named_parameters() if p.is_linear_weight})
    bar = tqdm(total=len(ids), unit="token", desc=f"calibrate on {text_file}", disable=not progress)
    with torch.inference_mode(), gemms:
        for start in range(0, len(ids), chunk_len):
            chunk = torch.tensor(ids[start:start + chunk_len])
            n = len(chunk)
            model(chunk, torch.arange(n), AttentionMetadata(torch.arange(n), [0, n], [n], torch.arange(blocks)[None]))
            for i, attn in enumerate(attention):  # the caches hold this chunk's keys and values (and older ones')
                keys[i] = torch.maximum(keys[i], attn.k_cache.abs().amax(dim=(0, 1, 3)))
                values[i] = torch.maximum(values[i], attn.v_cache.abs().amax(dim=(0, 1, 3)))
            bar.update(n)
    bar.close()
    return Ranges(gemms.amax, keys, values, len(ids))
