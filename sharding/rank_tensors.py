"""What a rank file holds for each parameter, and how it is cut from the checkpoint.

A parameter is written in one of these forms, decided once per PP stage (every TP rank of
the stage holds the same shapes):
- "float": cast to the engine's dtype (norms, embeddings, every weight of a float engine);
- "rounded": a GEMM weight of an int8wo or fp8 engine, quantized here per output row from
  the float (or dequantized) weight, with `<name>_scale`;
- "fp8": an fp8 engine's GEMM weight whose checkpoint stores it in E4M3 with a scale per
  tensor or per output row: the stored bytes, with that scale repeated per row (fused q/k/v
  whose tensors have scales of their own keep each its own rows' scale), exactly;
- "int4": an int4 engine's GEMM weight (dist_runtime/int4.py's layout: `<name>` packed,
  `<name>_scale`, `<name>_zero`, and `<layer>.g_idx` under act-order), as an AWQ or GPTQ
  checkpoint stores it, or rounded to nearest here (quantize_int4) from a float weight.

An fp8 GEMM weight may come with the static scale of its input, `<layer>.input_scale`:
calibrated at build, or the checkpoint's own (fused layers take their pieces' largest, so
that no piece's input saturates sooner than its checkpoint allowed; weights need no change,
as their scales are per row).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from dist_runtime.errors import CheckpointError
from dist_runtime.int4 import NIBBLES, WHOLE_INPUT, columns_per_group, group_count, quantize_int4
from dist_runtime.layers import unsliced
from dist_runtime.plan import DTYPES, Plan
from dist_runtime.quantization import (
    INT4_DTYPES,
    QUANTIZED_DTYPES,
    SCALE_SUFFIX,
    ZERO_SUFFIX,
    g_idx_name,
    input_scale_name,
    int4_table_dtype,
    quantize_weight,
)
from sharding.checkpoint import Checkpoint
from sharding.planner import int4_group_size
from sharding.prequantized import Int4Weight
from sharding.safetensors_writer import TensorSpec


@dataclasses.dataclass(frozen=True)
class Form:
    """How one parameter of a stage is written on each of its TP ranks."""

    kind: str  # "float", "rounded", "fp8" or "int4"
    input_scale: torch.Tensor | None = None  # fp8: the static scale of the GEMM's input, float32 [1]
    group_size: int = 0  # int4
    g_idx: torch.Tensor | None = None  # int4 under act-order: the group of each input column (whole layer)
    table_dtype: torch.dtype | None = None  # int4: of the scales and zero points


def forms(ck: Checkpoint, plan: Plan, model, input_scales: dict[str, torch.Tensor] | None) -> dict[str, Form]:
    """Each parameter's form on the ranks of `model`'s stage. `input_scales`: calibrated ones,
    which take the place of a checkpoint's own."""
    act_dtype = DTYPES[plan.dtype][0]
    stored_int4 = ck.scheme is not None and ck.scheme.kind == "int4"
    group = (int4_group_size(model, plan.tp, ck.scheme.group_size if stored_int4 else None)
             if plan.dtype in INT4_DTYPES else 0)
    out = {}
    for name, param in model.named_parameters():
        sources = model.checkpoint_names(name)
        if not param.is_linear_weight or plan.dtype not in (*QUANTIZED_DTYPES, *INT4_DTYPES):
            out[name] = Form("float")
        elif plan.dtype in INT4_DTYPES:
            out[name] = _int4_form(ck, name, sources, group, int4_table_dtype(act_dtype))
        else:
            out[name] = _fp8_form(ck, plan, name, param, sources, input_scales)
    return out


def _fp8_form(ck: Checkpoint, plan: Plan, name: str, param, sources: list[str],
              input_scales: dict[str, torch.Tensor] | None) -> Form:
    """"fp8" where the checkpoint's E4M3 values and scales are what the engine keeps: per tensor
    or per row. Experts' inputs scale per token, whatever scale the checkpoint stores."""
    scheme = ck.scheme
    stored = (plan.dtype == "fp8" and scheme is not None and scheme.kind == "fp8" and scheme.block is None
              and all(ck.fp8_scale(n) is not None for n in sources))
    kind = "fp8" if stored else "rounded"
    if input_scales is not None:
        # experts have none (calibration sees GEMMs of whole weights): their inputs scale per token
        return Form(kind, input_scales.get(name))
    scales = [ck.input_scale(n) for n in sources] if stored and param.parallel in ("column", "row") else [None]
    return Form(kind, None if None in scales else torch.stack(scales).amax(dim=0))


def _int4_form(ck: Checkpoint, name: str, sources: list[str], group: int, table: torch.dtype) -> Form:
    if not all(ck.int4_stored(n) for n in sources):
        return Form("int4", group_size=group, table_dtype=table)
    layouts = [ck.int4_layout(n) for n in sources]
    g_idx = layouts[0][0]
    if any((g is None) != (g_idx is None) or (g is not None and not g.equal(g_idx)) for g, _ in layouts):
        raise CheckpointError(f"{ck.path}: {', '.join(sources)} are fused into {name} but differ in act-order "
                              f"(g_idx); one GEMM needs one order of groups")
    if any(dtype != table for _, dtype in layouts):
        table = torch.float32  # what holds every stored scale exactly
    return Form("int4", group_size=group, g_idx=g_idx, table_dtype=table)


def specs(name: str, param, form: Form, dtype: torch.dtype, fmt: str) -> list[TensorSpec]:
    """The tensors `param` is written as on one rank, in writing order."""
    shape = tuple(param.shape)
    if form.kind == "float":
        return [TensorSpec(name, shape, dtype)]
    if form.kind == "int4":
        out, k = shape
        groups = _int4_groups(param, form)
        tensors = [TensorSpec(name, (out, k // NIBBLES), torch.int32),
                   TensorSpec(name + SCALE_SUFFIX, (out, groups), form.table_dtype),
                   TensorSpec(name + ZERO_SUFFIX, (out, groups), form.table_dtype)]
        return tensors + ([TensorSpec(g_idx_name(name), (k,), torch.int32)] if form.g_idx is not None else [])
    tensors = [TensorSpec(name, shape, QUANTIZED_DTYPES[fmt]), TensorSpec(name + SCALE_SUFFIX, shape[:-1],
                                                                          torch.float32)]
    return tensors + ([TensorSpec(input_scale_name(name), (1,), torch.float32)] if form.input_scale is not None
                      else [])


def _int4_groups(param, form: Form) -> int:
    """Groups of scales a rank keeps: those of its input columns, or all of the layer's where a
    row-parallel slice's columns may fall in any (act-order) or one group spans them all."""
    k = param.shape[1]
    if form.group_size == WHOLE_INPUT:
        return 1
    if form.g_idx is not None:
        return group_count(len(form.g_idx), form.group_size)
    return k // form.group_size


def read(ck: Checkpoint, sources: list[str], form: Form) -> list:
    """What the stage's ranks are cut from, read once: per checkpoint tensor, a float tensor,
    an (E4M3 values, row scales) pair, or an Int4Weight."""
    if form.kind == "fp8":
        return [ck.fp8_rows(n) for n in sources]
    if form.kind == "int4" and all(ck.int4_stored(n) for n in sources):
        return [ck.int4(n) for n in sources]
    return [ck.get(n) for n in sources]


def rank_tensors(name: str, param, form: Form, sources: list, dtype: torch.dtype,
                 fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(tensor name, tensor) of `param` on its rank, in the order of `specs`."""
    if form.kind == "float":
        yield name, param.shard_of(sources).to(dtype)
    elif form.kind == "rounded":
        weight, scale = quantize_weight(param.shard_of(sources), fmt)
        yield name, weight
        yield name + SCALE_SUFFIX, scale
    elif form.kind == "fp8":
        yield name, param.shard_of([values for values, _ in sources])
        yield name + SCALE_SUFFIX, _rows(param, [scale for _, scale in sources])
    else:
        yield from _int4_tensors(name, param, form, sources)
    if form.input_scale is not None:
        yield input_scale_name(name), form.input_scale


def _rows(param, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-output-row companions of a weight (scales), cut as its rows are: a row-parallel
    layer's ranks each hold every output row (of each of their experts, for stacked ones)."""
    if param.parallel == "expert-row":
        return torch.stack(tensors)
    return unsliced(tensors) if param.parallel == "row" else param.shard_of(tensors)


def _int4_tensors(name: str, param, form: Form, sources: list) -> Iterator[tuple[str, torch.Tensor]]:
    if not isinstance(sources[0], Int4Weight):  # float weights: this rank's slice, rounded here
        weight = param.shard_of(sources)
        qweight, scales, zeros = quantize_int4(weight, columns_per_group(weight.shape[1], form.group_size))
        yield name, qweight
        yield name + SCALE_SUFFIX, scales.to(form.table_dtype)
        yield name + ZERO_SUFFIX, zeros.to(form.table_dtype)
        return
    yield name, param.shard_of([w.qweight for w in sources])
    # a row-parallel rank keeps the tables of all the layer's groups where its columns may fall in any
    keep_all = param.parallel == "row" and (form.g_idx is not None or form.group_size == WHOLE_INPUT)
    for suffix, tables in ((SCALE_SUFFIX, [w.scales for w in sources]), (ZERO_SUFFIX, [w.zeros for w in sources])):
        yield name + suffix, (unsliced(tables) if keep_all else param.shard_of(tables)).to(form.table_dtype)
    if form.g_idx is not None:  # as a one-row matrix, cut as the weight's input columns are
        yield g_idx_name(name), param.shard_of([form.g_idx[None]])[0] if param.parallel == "row" else form.g_idx
