"""Read a Hugging Face safetensors checkpoint, single file or sharded, one tensor at a time
(memory-mapped: a tensor is read from disk only when asked for)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from dist_runtime.config import ModelConfig
from dist_runtime.errors import CheckpointError
from dist_runtime.models import stacked_sources

INDEX = "model.safetensors.index.json"


class Checkpoint:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{path}: not a folder")
        self.config = ModelConfig.from_dir(self.path)
        self._handles: dict[str, object] = {}
        self.file_of = self._weight_map()
        self.stacked = self._stacked() if self.config.moe else {}

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

    def _stacked(self) -> dict[str, tuple[str, tuple, tuple[int, ...]]]:
        """Tensors held stacked in one under our parameter's name (experts, as transformers 5 can
        save them: models.stacked_sources) -> (that tensor, the index of the piece within it, the
        piece's shape)."""
        found = {}
        for name, (param, index, count) in stacked_sources(self.config).items():
            if name in self.file_of or param not in self.file_of:
                continue
            shape = tuple(self._open(self.file_of[param]).get_slice(param).get_shape())
            if count == 1:  # only renamed
                found[name] = (param, (), shape)
                continue
            per = count // shape[0]  # pieces per expert, along its rows
            if count % shape[0] == 0 and shape[1] % per == 0:
                rows = shape[1] // per
                where = (index // per, slice(index % per * rows, (index % per + 1) * rows))
                found[name] = (param, where, (rows, *shape[2:]))
        return found

    def names(self) -> set[str]:
        return set(self.file_of) | set(self.stacked)

    def get(self, name: str) -> torch.Tensor:
        if name in self.stacked:
            param, where, _ = self.stacked[name]
            with safe_open(str(self.path / self.file_of[param]), framework="pt") as f:
                return f.get_slice(param)[where] if where else f.get_tensor(param)
        if name not in self.file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        try:
            # A fresh handle per tensor: closing it unmaps the file, so pages read for one tensor
            # do not stay in this process's resident memory while the rest of the model streams by.
            with safe_open(str(self.path / self.file_of[name]), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path / self.file_of[name]}: cannot read {name!r} ({e})") from e

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.stacked:
            return self.stacked[name][2]
        if name not in self.file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())
