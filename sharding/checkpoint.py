"""Read a Hugging Face safetensors checkpoint, single file or sharded, one tensor at a time
(memory-mapped: a tensor is read from disk only when asked for). A pre-quantized checkpoint
(sharding/prequantized.py) reads like a float one, weight by weight under its Hugging Face
name, dequantized; `fp8_rows`, `input_scale` and `int4` give what an fp8 or int4 engine
keeps of it as stored."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from dist_runtime.config import ModelConfig
from dist_runtime.errors import CheckpointError
from dist_runtime.int4 import dequantize_int4
from dist_runtime.models import stacked_sources
from dist_runtime.quantization import FP8, input_scale_name
from sharding.prequantized import (
    Int4Weight,
    act_order,
    dequantize_fp8,
    fp8_row_scales,
    fp8_scale_name,
    int4_shape,
    read_scheme,
    to_int4,
)
from sharding.safetensors_writer import DTYPE_NAMES

INDEX = "model.safetensors.index.json"
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class Checkpoint:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{path}: not a folder")
        self.config = ModelConfig.from_dir(self.path)
        self.scheme = read_scheme(self.path)  # an unread quantization is refused before any tensor is
        self._handles: dict[str, object] = {}
        self.file_of = self._weight_map()
        self.stacked = self._stacked() if self.config.moe else {}
        # int4 modules by the name of the weight they pack: "<module>.weight" -> "<module>"
        self._int4 = {} if self.scheme is None or self.scheme.kind != "int4" else {
            name.removesuffix("qweight") + "weight": name.removesuffix(".qweight")
            for name in self.file_of if name.endswith(".qweight")}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise CheckpointError(f"{index} names {file}, which is missing")
            return weight_map
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files (and no {INDEX})")
        weight_map = {}
        for file in files:
            for name in self._open(file.name).keys():
                weight_map[name] = file.name
        return weight_map

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{self.path / file}: not a readable safetensors file ({e})") from e
        return self._handles[file]

    def names(self) -> set[str]:
        """The Hugging Face names of the tensors it holds (an int4 module's weight among them)."""
        return set(self.file_of) | set(self._int4) | set(self.stacked)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`; a quantized weight dequantized to float32."""
        if name in self.stacked:
            param, where, _ = self.stacked[name]
            with safe_open(str(self.path / self.file_of[param]), framework="pt") as f:
                return f.get_slice(param)[where] if where else f.get_tensor(param)
        if name in self._int4:
            w = self.int4(name)
            return dequantize_int4(w.qweight, w.scales, w.zeros, w.group_size, w.g_idx)
        tensor = self._read(name)
        if tensor.dtype != FP8:
            return tensor
        scale = self.fp8_scale(name)
        if scale is None:
            raise CheckpointError(f"{self.path}: {name} is float8 with no weight_scale beside it")
        return dequantize_fp8(tensor, self._read(scale), self._block, scale)

    def fp8_scale(self, name: str) -> str | None:
        """The name of the scale stored beside weight `name` (an fp8 one), if any."""
        return fp8_scale_name(self.file_of, name.removesuffix(".weight"))

    def fp8_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the stored E4M3 weight, float32 scale [out]) of a weight whose scale is one per
        tensor or per output row."""
        scale, values = self.fp8_scale(name), self._read(name)
        rows = None if scale is None or values.dtype != FP8 else fp8_row_scales(
            values, self._read(scale), self._block, scale)
        if rows is None:
            raise CheckpointError(f"{self.path}: {name} is not stored in E4M3 with a scale per tensor or per row")
        return values, rows

    def input_scale(self, name: str) -> torch.Tensor | None:
        """The stored static fp8 scale (float32 [1]) of the input of weight `name`'s layer."""
        scale = input_scale_name(name)
        return self._read(scale).float().reshape(1) if scale in self.file_of else None

    def int4_stored(self, name: str) -> bool:
        """Whether weight `name` is stored in AWQ's or GPTQ's int4."""
        return name in self._int4

    def int4(self, name: str) -> Int4Weight:
        """An AWQ or GPTQ weight in the int4 engine's layout, every value as stored."""
        module = self._int4[name]
        return to_int4(self.scheme, self._read(f"{module}.qweight"), self._read(f"{module}.qzeros"),
                       self._read(f"{module}.scales"), self._g_idx(module), module)

    def int4_layout(self, name: str) -> tuple[torch.Tensor | None, torch.dtype]:
        """(g_idx as the int4 layout keeps it, the dtype of the stored scales) of an int4 weight,
        without reading the weight."""
        module = self._int4[name]
        scales = f"{module}.scales"
        dtype = TORCH_DTYPES[self._open(self.file_of[scales]).get_slice(scales).get_dtype()]
        return act_order(self.scheme, self._g_idx(module), self.shape(name)[1], module), dtype

    def _g_idx(self, module: str) -> torch.Tensor | None:
        name = f"{module}.g_idx"
        return self._read(name) if name in self.file_of else None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.stacked:
            return self.stacked[name][2]
        if name in self._int4:
            return int4_shape(self.scheme, self._stored_shape(f"{self._int4[name]}.qweight"))
        return self._stored_shape(name)

    def _stacked(self) -> dict[str, tuple[str, tuple, tuple[int, ...]]]:
        """Tensors held stacked in one under our parameter's name (experts, as transformers 5 can
        save them: models.stacked_sources) -> (that tensor, the index of the piece within it, the
        piece's shape)."""
        found = {}
        for name, (param, index, count) in stacked_sources(self.config).items():
            if name in self.file_of or param not in self.file_of:
                continue
            shape = self._stored_shape(param)
            if count == 1:  # only renamed
                found[name] = (param, (), shape)
                continue
            per = count // shape[0]  # pieces per expert, along its rows
            if count % shape[0] == 0 and shape[1] % per == 0:
                rows = shape[1] // per
                where = (index // per, slice(index % per * rows, (index % per + 1) * rows))
                found[name] = (param, where, (rows, *shape[2:]))
        return found

    @property
    def _block(self) -> tuple[int, int] | None:
        return None if self.scheme is None else self.scheme.block

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        try:
            # A fresh handle per tensor: closing it unmaps the file, so pages read for one tensor
            # do not stay in this process's resident memory while the rest of the model streams by.
            with safe_open(str(self.path / self.file_of[name]), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path / self.file_of[name]}: cannot read {name!r} ({e})") from e

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        if name not in self.file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())
