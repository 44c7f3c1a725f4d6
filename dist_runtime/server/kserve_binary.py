"""KServe v2's binary tensor data extension, which Triton's clients use by default: a JSON
header (its length in the Inference-Header-Content-Length header), then each binary tensor's
raw bytes in order; BYTES elements are each a 4-byte little-endian length and the bytes."""

from __future__ import annotations

import json
import struct

import numpy as np

HEADER = "inference-header-content-length"
NUMPY_TYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
               "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
               "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


class BinaryError(ValueError):
    """The binary part does not match what the JSON header says."""


def split(raw: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(the JSON header, the binary part) of a request body."""
    if header_length is None:
        header, binary = json.loads(raw), b""
    elif not header_length.isdigit() or int(header_length) > len(raw):
        raise BinaryError(f"{HEADER} {header_length!r} does not fit a body of {len(raw)} bytes")
    else:
        header, binary = json.loads(raw[: int(header_length)]), raw[int(header_length):]
    if not isinstance(header, dict):
        raise BinaryError("the request must be a JSON object")
    return header, binary


def fill_inputs(header: dict, binary: bytes) -> None:
    """Give each input sent as binary its `data` (as JSON tensors carry it)."""
    offset = 0
    for tensor in header.get("inputs") or []:
        size = ((tensor.get("parameters") or {}) if isinstance(tensor, dict) else {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or offset + size > len(binary):
            raise BinaryError(f"input {tensor.get('name')!r}: binary_data_size {size} runs past the body")
        tensor["data"] = decode(tensor.get("datatype"), binary[offset:offset + size])
        offset += size


def decode(datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        values, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise BinaryError("a BYTES element's length is cut off")
            (n,) = struct.unpack_from("<I", raw, i)
            values.append(raw[i + 4:i + 4 + n].decode("utf-8", errors="replace"))
            i += 4 + n
        return values
    if datatype not in NUMPY_TYPES:
        raise BinaryError(f"unknown datatype {datatype!r}")
    return np.frombuffer(raw, dtype=NUMPY_TYPES[datatype]).tolist()


def encode_bytes(values: list[str]) -> bytes:
    out = b""
    for value in values:
        data = value.encode()
        out += struct.pack("<I", len(data)) + data
    return out


def wants_binary(header: dict, name: str) -> bool:
    """Whether the client asked for output `name` as binary data."""
    for output in header.get("outputs") or []:
        if isinstance(output, dict) and output.get("name") == name:
            return bool((output.get("parameters") or {}).get("binary_data", False))
    return bool((header.get("parameters") or {}).get("binary_data_output", False))
