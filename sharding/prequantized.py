"""Checkpoints quantized before they reach us: which `quantization_config`s are read, and how
their tensors turn into float weights, or into the values an fp8 or int4 engine keeps as stored.

FP8 (E4M3 weights; weight = e4m3 * its scale, in float32):
- compressed-tensors (llm-compressor), formats float-quantized and naive-quantized: `weight`
  and `weight_scale`, one per tensor ([1]), per output channel ([out, 1]) or per block
  ([ceil(out/b0), ceil(in/b1)]); `input_scale` [1] where activations were calibrated (static),
  none where they are scaled per token at run time.
- ModelOpt, quant_algo FP8 (`weight_scale` per tensor, static `input_scale`) and
  FP8_PER_CHANNEL_PER_TOKEN (`weight_scale` [out]), in config.json or hf_quant_config.json.
- fp8 with `weight_block_size` (DeepSeek V3, Qwen3-FP8): `weight_scale_inv` per 128 x 128
  block, which multiplies despite its name; activations are dynamic. Without a block size,
  `weight_scale` per tensor as above.
Modules a checkpoint keeps in float (compressed-tensors' `ignore`, ModelOpt's
`exclude_modules`) are read as what they hold: a float `weight` and no scale.

INT4 weight-only, in groups of input columns, weight = (q - zero) * scale (zero in integer units):
- AWQ (version gemm, zero points): `qweight` int32 [in, out/8], eight outputs per word in AWQ's
  order (nibble j holds output 8i + AWQ_ORDER[j]); `qzeros` int32 [in/g, out/8] alike;
  `scales` [in/g, out].
- GPTQ (checkpoint_format gptq or gptq_v2): `qweight` int32 [in/8, out], eight inputs per word,
  low nibble first; `qzeros` int32 [groups, out/8], eight outputs per word, low nibble first,
  stored one less than the zero point in format gptq (v1); `scales` [groups, out]; `g_idx`
  int32 [in], each input column's group (act-order, desc_act, permutes it). Symmetric
  quantization (sym) stores the zero point 8 like any other.
Both become the int4 engine's own layout (dist_runtime/int4.py) without changing a value.

Any other quantization_config is refused by its quant_method before anything is built.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dist_runtime.errors import CheckpointError
from dist_runtime.int4 import NIBBLES, WHOLE_INPUT, columns_per_group, group_count, nibbles, pack_int4

READ = ("compressed-tensors (FP8, formats float-quantized and naive-quantized)",
        "modelopt (quant_algo FP8, FP8_PER_CHANNEL_PER_TOKEN)", "fp8 (per tensor, or block-wise weight_block_size)",
        "awq (4-bit, version gemm, zero points)", "gptq (4-bit, checkpoint_format gptq or gptq_v2)")
MODELOPT_CONFIG = "hf_quant_config.json"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds output column 8i + AWQ_ORDER[j]
FP8_SCALES = ("weight_scale", "weight_scale_inv")  # either multiplies the stored E4M3 values


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A checkpoint's quantization, as far as reading its tensors needs."""

    method: str  # quant_method, as the checkpoint names it
    kind: str  # "fp8" or "int4": the engine dtype family that keeps its values as stored
    block: tuple[int, int] | None = None  # fp8: block-wise weight scales over blocks of this shape
    group_size: int = WHOLE_INPUT  # int4: input columns per scale, or one group over a layer's whole input
    zero_offset: int = 0  # int4: added to a stored zero point (GPTQ v1 stores it less one)
    act_order: bool = False  # int4: groups are not runs of columns (GPTQ's desc_act), g_idx says which

    def plan_options(self) -> dict[str, Any]:
        """make_plan's options for the int4 groups this checkpoint stores (none for fp8)."""
        if self.kind != "int4":
            return {}
        return {"group_size": self.group_size, "act_order": self.act_order}


class Int4Weight(NamedTuple):
    """A weight in the int4 engine's layout (dist_runtime/int4.py), whole (not yet sliced)."""

    qweight: torch.Tensor  # int32 [out, in / 8]
    scales: torch.Tensor  # [out, groups]
    zeros: torch.Tensor  # [out, groups], whole numbers, same dtype as scales
    group_size: int
    g_idx: torch.Tensor | None  # int32 [in] where groups are not runs of group_size columns


def read_scheme(path: str | Path) -> Scheme | None:
    """The checkpoint folder's quantization (config.json's `quantization_config`, or ModelOpt's
    hf_quant_config.json), None for a float checkpoint; CheckpointError for one we do not read."""
    path = Path(path)
    config_file = path / "config.json"
    config = _json(config_file) if config_file.is_file() else {}
    quant, where = config.get("quantization_config"), config_file
    if quant is None and "compression_config" in config:  # compressed-tensors' name before transformers 4.45
        quant = config["compression_config"]
    if quant is None and (path / MODELOPT_CONFIG).is_file():
        where = path / MODELOPT_CONFIG
        quant = {"quant_method": "modelopt", **_json(where)}
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise CheckpointError(f"{where}: quantization_config is {type(quant).__name__}, not an object")
    method = str(quant.get("quant_method", "")).lower()
    readers = {"compressed-tensors": _compressed_tensors, "modelopt": _modelopt, "fp8": _fp8, "awq": _awq,
               "gptq": _gptq}

    def refuse(what: str | None = None) -> CheckpointError:
        return CheckpointError(f"{where}: quant_method {method or None!r}{f' with {what}' if what else ''} is not "
                               f"read; this runtime reads {'; '.join(READ)}")

    if method not in readers:
        raise refuse()
    return readers[method](quant, refuse)


def plan_options(path: str | Path) -> dict[str, Any]:
    """make_plan's options for the checkpoint folder `path`: those of its int4 groups; refuses a
    quantization this runtime does not read."""
    scheme = read_scheme(path)
    return {} if scheme is None else scheme.plan_options()


def _json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: holds {type(data).__name__}, not an object")
    return data


def _compressed_tensors(q: dict, refuse) -> Scheme:
    fmt = q.get("format")
    sparsity = q.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise refuse(f"sparsity format {sparsity.get('format')!r}")
    if q.get("transform_config"):
        raise refuse("a transform_config (rotations)")
    groups = list((q.get("config_groups") or {}).values())
    if not groups:
        raise refuse("no config_groups")
    blocks = set()
    for group in groups:
        group_fmt = group.get("format") or fmt
        if group_fmt not in ("float-quantized", "naive-quantized"):
            raise refuse(f"format {group_fmt!r}")
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        if (weights.get("type"), weights.get("num_bits")) != ("float", 8):
            raise refuse(f"{weights.get('num_bits')}-bit {weights.get('type')} weights")
        strategy = weights.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise refuse(f"weight strategy {strategy!r}")
        if strategy == "block" and len(weights.get("block_structure") or ()) != 2:
            raise refuse(f"block strategy with block_structure {weights.get('block_structure')!r}")
        blocks.add(tuple(weights["block_structure"]) if strategy == "block" else None)
        if inputs is not None:
            if (inputs.get("type"), inputs.get("num_bits")) != ("float", 8):
                raise refuse(f"{inputs.get('num_bits')}-bit {inputs.get('type')} activations")
            if not inputs.get("dynamic") and inputs.get("strategy") != "tensor":
                raise refuse(f"static activation strategy {inputs.get('strategy')!r}")
    if len(blocks) > 1:
        raise refuse(f"config groups of different weight blocks {sorted(map(str, blocks))}")
    return Scheme("compressed-tensors", "fp8", block=blocks.pop())


def _modelopt(q: dict, refuse) -> Scheme:
    algo = str((q.get("quantization") or q).get("quant_algo", "")).upper()
    if algo not in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        raise refuse(f"quant_algo {algo or None!r}")
    return Scheme("modelopt", "fp8")


def _fp8(q: dict, refuse) -> Scheme:
    if q.get("fmt", "e4m3") != "e4m3":
        raise refuse(f"fmt {q.get('fmt')!r}")
    block = q.get("weight_block_size")
    if block is not None and (len(block) != 2 or q.get("activation_scheme", "dynamic") != "dynamic"):
        raise refuse(f"weight_block_size {block} and activation_scheme {q.get('activation_scheme')!r}")
    return Scheme("fp8", "fp8", block=tuple(block) if block else None)


def _awq(q: dict, refuse) -> Scheme:
    version = str(q.get("version") or q.get("format") or "gemm").lower()
    if q.get("bits", 4) != 4 or version != "gemm" or not q.get("zero_point", True):
        raise refuse(f"{q.get('bits')}-bit weights, version {version!r}, zero_point {q.get('zero_point', True)}")
    return Scheme("awq", "int4", group_size=_group_size(q))


def _gptq(q: dict, refuse) -> Scheme:
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if q.get("bits") != 4 or fmt not in ("gptq", "gptq_v2"):
        raise refuse(f"{q.get('bits')}-bit weights in checkpoint_format {fmt!r}")
    return Scheme("gptq", "int4", group_size=_group_size(q), zero_offset=1 if fmt == "gptq" else 0,
                  act_order=bool(q.get("desc_act")) and not q.get("static_groups"))


def _group_size(q: dict) -> int:
    size = q.get("group_size", 128)
    return WHOLE_INPUT if size in (None, 0, WHOLE_INPUT) else int(size)


# ---- FP8 tensors ----

def fp8_scale_name(names, module: str) -> str | None:
    """The scale stored beside `<module>.weight`, if any."""
    return next((f"{module}.{s}" for s in FP8_SCALES if f"{module}.{s}" in names), None)


def _scale_grid(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None, name: str) -> str:
    """Which scale this is for a weight of `shape`: "tensor", "row" or "block"."""
    out, inp = shape
    if scale.numel() == 1:
        return "tensor"
    if block is not None and tuple(scale.shape) == (-(-out // block[0]), -(-inp // block[1])):
        return "block"
    if block is None and scale.numel() == out and scale.dim() <= 2 and scale.shape[0] == out:
        return "row"
    expected = f"per {block[0]} x {block[1]} block" if block else "per output row"
    raise CheckpointError(f"{name} has shape {list(scale.shape)}, which is no scale of a {list(shape)} weight "
                          f"(one per tensor, or {expected})")


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                   name: str) -> torch.Tensor:
    """The float32 weight: each E4M3 value times its tensor's, row's or block's scale."""
    rows = fp8_row_scales(values, scale, block, name)
    if rows is not None:
        return values.float() * rows[:, None]
    out, inp = values.shape
    per_element = scale.float().repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]
    return values.float() * per_element


def fp8_row_scales(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                   name: str) -> torch.Tensor | None:
    """float32 [out]: the scale of each output row, where the stored scale is one (per tensor or
    per row); None for block-wise scales, which no per-row scale reproduces."""
    grid = _scale_grid(scale, tuple(values.shape), block, name)
    if grid == "block":
        return None
    return scale.float().reshape(-1).expand(values.shape[0]).contiguous()


# ---- INT4 tensors ----

def _awq_columns(words: torch.Tensor) -> torch.Tensor:
    """AWQ words [rows, out/8] -> [rows, out] in output order."""
    stored = nibbles(words)
    columns = torch.empty_like(stored)
    columns[..., list(AWQ_ORDER)] = stored
    return columns.flatten(-2)


def int4_shape(scheme: Scheme, qweight_shape: tuple[int, ...]) -> tuple[int, int]:
    """[out, in] of the weight a stored qweight packs."""
    rows, cols = qweight_shape
    return (cols * NIBBLES, rows) if scheme.method == "awq" else (cols, rows * NIBBLES)


def to_int4(scheme: Scheme, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            g_idx: torch.Tensor | None, name: str) -> Int4Weight:
    """An AWQ or GPTQ module's tensors in the int4 engine's layout, every value as stored."""
    out, inp = int4_shape(scheme, tuple(qweight.shape))
    if scheme.method == "awq":
        q = _awq_columns(qweight).t()
        zeros = _awq_columns(qzeros)
    else:
        q = nibbles(qweight).permute(0, 2, 1).reshape(inp, out).t()
        zeros = nibbles(qzeros).flatten(-2)
    group, groups = columns_per_group(inp, scheme.group_size), group_count(inp, scheme.group_size)
    for tensor, what in ((zeros, "qzeros"), (scales, "scales")):
        if tuple(tensor.shape) != (groups, out):
            raise CheckpointError(f"{name}: {what} unpacks to {list(tensor.shape)}; a [{out}, {inp}] weight in "
                                  f"groups of {group} needs [{groups}, {out}]")
    scales = scales.t().contiguous()
    return Int4Weight(pack_int4(q.contiguous()), scales, (zeros.t() + scheme.zero_offset).to(scales.dtype), group,
                      act_order(scheme, g_idx, inp, name))


def act_order(scheme: Scheme, g_idx: torch.Tensor | None, inp: int, name: str) -> torch.Tensor | None:
    """A stored g_idx as the int4 layout keeps it: int32, or None where it only says what the
    group size does (column k in group k // group_size)."""
    if g_idx is None:
        return None
    group, groups = columns_per_group(inp, scheme.group_size), group_count(inp, scheme.group_size)
    g_idx = g_idx.to(torch.int32)
    if tuple(g_idx.shape) != (inp,) or g_idx.min() < 0 or g_idx.max() >= groups:
        raise CheckpointError(f"{name}: g_idx must give each of the {inp} input columns one of {groups} groups")
    if inp % group == 0 and g_idx.equal(torch.arange(inp, dtype=torch.int32) // group):
        return None
    return g_idx
