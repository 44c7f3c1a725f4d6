"""The TP x PP planner: which layers and which slice of every weight each rank holds, and
how much memory that takes, decided before anything is built."""

from __future__ import annotations

import dataclasses
import math
import re

from dist_runtime.config import ModelConfig
from dist_runtime.errors import PlanError
from dist_runtime.int4 import NIBBLES, WHOLE_INPUT, group_count
from dist_runtime.layers.embedding import padded_vocab
from dist_runtime.layers.moe import EXCHANGES
from dist_runtime.mapping import Mapping
from dist_runtime.models import build_model
from dist_runtime.plan import DTYPES, KV_DTYPES, Plan, RankPlan, WeightSlice
from dist_runtime.quantization import INT4_DTYPES, int4_table_dtype

GiB = 2**30
RUNTIME_OVERHEAD = 1 * GiB  # CUDA context, cuBLAS/NCCL workspaces: counted only against --gpu-mem
INT4_GROUP_SIZES = (128, 64, 32)  # tried in turn for int4 weights rounded here from float ones


def split_layers(num_layers: int, pp: int, counts: list[int] | None = None) -> list[int]:
    """Layers per stage: as given, or as even as possible (earlier stages take the remainder)."""
    if pp > num_layers:
        raise PlanError(f"pp={pp} stages need at least {pp} layers; the model has {num_layers}")
    if counts is None:
        return [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]
    if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
        raise PlanError(f"layer split {counts} must give each of pp={pp} stages at least one layer "
                        f"and {num_layers} layers in all")
    return list(counts)


def make_plan(config: ModelConfig, tp: int = 1, pp: int = 1, dtype: str = "bf16", *,
              kv_cache_dtype: str = "auto", layer_counts: list[int] | None = None, max_batch_size: int = 16,
              max_seq_len: int | None = None, max_num_tokens: int | None = None, block_size: int = 16,
              gpu_mem_gib: float | None = None, group_size: int | None = None, act_order: bool = False,
              ep: int = 1, expert_exchange: str = "all-reduce") -> Plan:
    """`group_size`, `act_order`: an int4 engine's groups as its checkpoint stores them (see
    int4_group_size); the engine's own choice where it rounds float weights (None). `ep`: a
    mixture's experts split into that many groups of whole experts per TP group, and
    `expert_exchange` how the group's expert outputs meet (layers/moe.py)."""
    _check_experts(config, tp, dtype, ep, expert_exchange)
    if dtype not in DTYPES:
        raise PlanError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if kv_cache_dtype not in KV_DTYPES:
        raise PlanError(f"kv cache dtype {kv_cache_dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if tp < 1 or pp < 1:
        raise PlanError(f"tp and pp must be at least 1 (got tp={tp}, pp={pp})")
    max_seq_len = max_seq_len or min(config.max_position_embeddings, 4096)
    if max_seq_len > config.max_position_embeddings:
        raise PlanError(f"max_seq_len {max_seq_len} exceeds the model's {config.max_position_embeddings} positions")
    max_num_tokens = max_num_tokens or min(8192, max_batch_size * max_seq_len)
    counts = split_layers(config.num_layers, pp, layer_counts)
    plan = Plan(tp, pp, dtype, kv_cache_dtype, counts, max_batch_size, max_seq_len, max_num_tokens, block_size,
                num_kv_blocks=max_batch_size * -(-max_seq_len // block_size),
                gpu_mem_bytes=None if gpu_mem_gib is None else int(gpu_mem_gib * GiB), ranks=[], ep=ep,
                expert_exchange=expert_exchange if ep > 1 else "all-reduce")
    # The TP ranks of a stage hold slices of one shape (sizes divide evenly, or a KV head is
    # replicated whole, or each holds as many experts): one model build per stage, not per rank
    # (a 405B search built 128).
    stages: dict[int, RankPlan] = {}
    for m in plan.mapping().all_ranks():
        if m.pp_rank not in stages:
            stages[m.pp_rank] = _plan_rank(config, plan, m, group_size, act_order)
        stage = stages[m.pp_rank]
        held = m.experts(config.moe.num_experts) if config.moe else None
        plan.ranks.append(dataclasses.replace(stage, rank=m.rank, tp_rank=m.tp_rank, memory=dict(stage.memory),
                                              weights=list(stage.weights),
                                              experts=[held.start, held.stop] if held else None))
    return plan


def _plan_rank(config: ModelConfig, plan: Plan, mapping: Mapping, group_size: int | None,
               act_order: bool) -> RankPlan:
    act_dtype, quant_bytes = DTYPES[plan.dtype]
    layers = plan.layer_range(mapping.pp_rank)
    model = build_model(config, mapping, layers, act_dtype)
    if plan.dtype in INT4_DTYPES:
        group_size = int4_group_size(model, plan.tp, group_size)
    weights, weight_bytes = [], 0
    for name, param in model.named_parameters():
        weights.append(WeightSlice(name, list(param.shape), param.parallel, _folded(model.checkpoint_names(name))))
        if plan.dtype in INT4_DTYPES and param.is_linear_weight:
            weight_bytes += _int4_bytes(param, plan.tp, group_size, act_order, int4_table_dtype(act_dtype).itemsize)
        elif quant_bytes and param.is_linear_weight:
            weight_bytes += param.numel() * quant_bytes + param.numel() // param.shape[-1] * 4  # + a scale per row
        else:
            weight_bytes += param.numel() * act_dtype.itemsize
    attn = model.attention_layers()
    kv_bytes = plan.kv_dtype.itemsize
    kv_cache = sum(2 * plan.num_kv_blocks * plan.block_size * a.num_kv_heads * a.head_dim * kv_bytes for a in attn)
    memory = {"weights": weight_bytes, "kv_cache": kv_cache,
              "activations": _activation_bytes(config, plan, act_dtype.itemsize)}
    if plan.gpu_mem_bytes is not None:
        memory["runtime"] = RUNTIME_OVERHEAD
    return RankPlan(mapping.rank, mapping.tp_rank, mapping.pp_rank, [layers.start, layers.stop], memory, weights)


def int4_group_size(model, tp: int, group_size: int | None) -> int:
    """The int4 group size of a stage's linear layers: `group_size` as a checkpoint stores it,
    whose groups (and int32 words of packed values) each rank's slice of a row-parallel layer's
    input must hold whole (unless a group spans the whole input, WHOLE_INPUT, which every rank
    then keeps); or, for weights
    rounded here (None), the largest of INT4_GROUP_SIZES that divides every such input."""
    inputs = {name.removesuffix(".weight"): (param.shape[1], param.parallel) for name, param in
              model.named_parameters() if param.is_linear_weight}  # no experts: _check_experts refuses them
    if group_size is None:
        for size in INT4_GROUP_SIZES:
            if all(k % size == 0 for k, _ in inputs.values()):
                return size
        layer, (k, _) = next((n, i) for n, i in inputs.items() if i[0] % INT4_GROUP_SIZES[-1])
        raise PlanError(f"{layer}: {k} input columns per rank (tp={tp}) hold no whole int4 groups of "
                        f"{' or '.join(map(str, INT4_GROUP_SIZES))}")
    for layer, (k, parallel) in inputs.items():
        if parallel != "row":
            continue
        if k % NIBBLES:  # a rank's packed slice is whole int32 words
            raise PlanError(f"{layer}: its {k * tp} input columns over tp={tp} give each rank {k}, not a whole "
                            f"number of int32 words of {NIBBLES} int4 values")
        if group_size != WHOLE_INPUT and k % group_size:
            raise PlanError(f"{layer}: its {k * tp} input columns over tp={tp} give each rank {k}, not a whole "
                            f"number of the checkpoint's int4 groups of {group_size}")
    return group_size


def _int4_bytes(param, tp: int, group_size: int, act_order: bool, table_bytes: int) -> int:
    """Packed int4 values, a scale and a zero point per row and group, and a group per input
    column under act-order. A row-parallel slice under act-order (or of one whole-input
    group) keeps the whole layer's groups: its columns may fall in any of them."""
    out, k = param.shape
    groups = group_count(k * tp if param.parallel == "row" and act_order else k, group_size)
    return out * k // 2 + 2 * out * groups * table_bytes + (4 * k if act_order else 0)


def _check_experts(config: ModelConfig, tp: int, dtype: str, ep: int, exchange: str) -> None:
    if config.moe and dtype in INT4_DTYPES:
        raise PlanError(f"--dtype {dtype}: int4 engines of mixtures of experts are not built yet; "
                        f"fp8, int8wo, bf16 and fp16 are")
    if ep < 1 or tp % ep:
        raise PlanError(f"ep={ep} must be at least 1 and divide tp={tp}")
    if ep > 1 and config.moe is None:
        raise PlanError(f"ep={ep}: {config.model_type} has no experts to split")
    if exchange not in EXCHANGES:
        raise PlanError(f"expert exchange {exchange!r} is not one of {', '.join(EXCHANGES)}")


def _folded(names: list[str]) -> list[str]:
    """Checkpoint names with an expert's number as {e}: a rank's experts are its RankPlan's."""
    return list(dict.fromkeys(re.sub(r"\.experts\.\d+\.", ".experts.{e}.", name) for name in names))


def _activation_bytes(c: ModelConfig, plan: Plan, item: int) -> int:
    """An estimate of the largest step's live activations: the residual stream and norm output,
    the fused QKV and gate/up outputs of one layer (for experts, of every token's top k, and
    their float32 router scores), and the float32 logits of a full batch."""
    tp = plan.tp
    qkv = (c.num_heads + 2 * max(1, c.num_kv_heads // tp) * tp) * c.head_dim // tp
    per_token = 3 * c.hidden_size + qkv + 3 * c.intermediate_size // tp
    if c.moe:
        per_token += 3 * c.moe.top_k * c.moe.intermediate_size * plan.ep // tp + c.moe.top_k * c.hidden_size
        per_token += c.moe.num_experts * 4 // item
    return plan.max_num_tokens * per_token * item + plan.max_batch_size * padded_vocab(c.vocab_size, tp) * 4


def smallest_fitting_plan(config: ModelConfig, dtype: str, gpu_mem_gib: float, gpus_per_node: int = 8,
                          max_gpus: int = 256, **options) -> Plan | None:
    """The layout with the fewest GPUs that fits: TP within a node, then PP across nodes. A
    mixture's experts go in as many groups as both the TP group and they divide into: whole
    experts per rank take the memory that slices of all of them do, in larger GEMMs."""
    options.pop("ep", None)
    candidates = sorted(((tp, pp) for tp in (1, 2, 4, 8, 16) if tp <= gpus_per_node
                         for pp in range(1, config.num_layers + 1) if tp * pp <= max_gpus),
                        key=lambda tp_pp: (tp_pp[0] * tp_pp[1], tp_pp[1]))
    weights = None  # every rank's weights in the first layout (one GPU): fewer GPUs than they fill never fit
    for tp, pp in candidates:
        if weights is not None and weights > tp * pp * gpu_mem_gib * GiB:
            continue
        try:
            ep = math.gcd(tp, config.moe.num_experts) if config.moe else 1
            plan = make_plan(config, tp, pp, dtype, gpu_mem_gib=gpu_mem_gib, ep=ep, **options)
        except PlanError:
            continue
        if plan.fits:
            return plan
        weights = weights or sum(r.memory["weights"] for r in plan.ranks)
    return None
