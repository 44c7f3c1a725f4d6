"""Write a safetensors file one tensor at a time.

The `safetensors` library writes a whole dict of tensors at once; an engine or checkpoint
shard may be tens of GB, so we write the header from the known shapes first and then stream
each tensor's bytes, hashing them on the way (the format is a length, a JSON header, raw data).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class StreamingWriter:
    """Writes `specs` in order; `write` checks each tensor against its spec. `sha256` and
    `nbytes` describe the whole file once `close` has run."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = specs
        self._next = 0
        self._hash = hashlib.sha256()
        header, offset = {}, 0
        for spec in specs:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.nbytes = 8 + len(raw) + offset
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _emit(self, data) -> None:
        self._hash.update(data)
        self._file.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{self.path}: expected {spec}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._emit(memoryview(data))
        self._next += 1

    def close(self) -> str:
        """Finish the file and return its sha256."""
        self._file.close()
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next:]]
            raise ValueError(f"{self.path}: {len(missing)} tensors never written, first {missing[0]}")
        return self._hash.hexdigest()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._file.close()
