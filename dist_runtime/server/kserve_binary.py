"""KServe v2's binary tensor data extension, which Triton's clients use by default: a JSON
header (its length in the Inference-Header-Content-Length header), then each binary tensor's
raw bytes in order; BYTES elements are each a 4-byte little-endian length and the bytes."""

from __future__ import annotations

import struct

import numpy as np

HEADER = "inference-header-content-length"
NUMPY_TYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
               "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
               "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


class BinaryError(ValueError):
    """The binary part does not match what the JSON header says."""


def split(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON header, the binary part) of a request body."""
    if header_length is None:
        return raw, b""
    if not header_length.isdigit() or int(header_length) > len(raw):
        raise BinaryError(f"{HEADER} {header_length!r} does not fit a body of {len(raw)} bytes")
    return raw[: int(header_length)], raw[int(header_length):]


def fill_inputs(inputs: list, binary: bytes) -> None:
    """Give each input tensor sent as binary its `data` (as JSON tensors carry it)."""
    offset = 0
    for tensor in inputs:
        size = tensor.parameters.binary_data_size if tensor.parameters else None
        if size is None:
            continue
        if offset + size > len(binary):
            raise BinaryError(f"inputs.{tensor.name}: binary_data_size {size} runs past the body")
        tensor.data = decode(tensor.datatype, binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise BinaryError(f"the body has {len(binary) - offset} bytes that no input's binary_data_size covers")


def decode(datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        values, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise BinaryError("a BYTES element's length is cut off")
            (n,) = struct.unpack_from("<I", raw, i)
            if i + 4 + n > len(raw):
                raise BinaryError("a BYTES element runs past its tensor")
            try:
                values.append(raw[i + 4:i + 4 + n].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise BinaryError(f"a BYTES element is not UTF-8 text: {e}") from e
            i += 4 + n
        return values
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if len(raw) % dtype.itemsize:
        raise BinaryError(f"{len(raw)} bytes are no whole number of {datatype} values")
    return np.frombuffer(raw, dtype=dtype).tolist()


def encode_bytes(values: list[str]) -> bytes:
    out = b""
    for value in values:
        data = value.encode()
        out += struct.pack("<I", len(data)) + data
    return out
