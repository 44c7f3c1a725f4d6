"""The `plan` command's human-readable report."""

from __future__ import annotations

import re

from dist_runtime.config import ModelConfig
from dist_runtime.layers.embedding import padded_vocab
from dist_runtime.layers.linear import kv_head_range
from dist_runtime.plan import Plan


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _weight_patterns(plan: Plan) -> list[list[str]]:
    """One row per kind of weight (layer numbers folded into *): how it is sliced."""
    seen: dict[str, list[str]] = {}
    for rank in plan.ranks:
        for w in rank.weights:
            key = re.sub(r"\.\d+\.", ".*.", w.name)
            sources = ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", s).rsplit(".", 2)[-2] for s in w.sources))
            seen.setdefault(key, [key, w.parallel, "x".join(map(str, w.shape)), sources])
    return [["weight", "split", "per-rank shape", "made of"], *seen.values()]


def _span(first: int, stop: int) -> str:
    return f"{first}-{stop - 1}" if stop - first > 1 else str(first)


def _experts(config: ModelConfig, plan: Plan) -> list[str]:
    """The line on a mixture's experts: how they are split, and how their outputs meet."""
    moe, m = config.moe, plan.mapping()
    chosen = f"top {moe.top_k}" + (", renormalised" if moe.norm_topk_prob else "")
    split = f"each split over tp/ep={m.moe_tp} ranks" if m.moe_tp > 1 else "whole"
    if plan.ep > 1:
        split = (f"in ep={plan.ep} groups of {len(m.experts(moe.num_experts))}, {split}; "
                 f"outputs meet by {plan.expert_exchange}")
    dense = f"; layers {', '.join(map(str, moe.dense_layers))} dense" if moe.dense_layers else ""
    return [f"experts: {moe.num_experts} per layer ({chosen}), {split}{dense}"]


def _nodes(plan: Plan, gpus_per_node: int) -> list[str]:
    """What each node of `gpus_per_node` GPUs holds, where the plan takes more than one."""
    if plan.world_size <= gpus_per_node:
        return []
    lines = []
    for node, first in enumerate(range(0, plan.world_size, gpus_per_node)):
        ranks = plan.ranks[first:first + gpus_per_node]
        stages = sorted({(r.pp_rank, *r.layers) for r in ranks})
        held = "; ".join(f"stage {pp} (layers {_span(a, b)})" for pp, a, b in stages)
        if ranks[0].experts is not None:
            held += f"; experts {_span(min(r.experts[0] for r in ranks), max(r.experts[1] for r in ranks))}"
        lines.append(f"node {node}: ranks {_span(ranks[0].rank, ranks[-1].rank + 1)}, {held}, "
                     f"{human_bytes(sum(r.memory['weights'] for r in ranks))} of weights")
    return [*lines, ""]


def format_plan(config: ModelConfig, plan: Plan, suggestion: Plan | None, source: str,
                gpus_per_node: int = 8) -> str:
    c = config
    kv_local = len(kv_head_range(c.num_kv_heads, plan.tp, 0))
    kv_note = (f"{c.num_kv_heads} KV heads over tp={plan.tp}: "
               + (f"{kv_local} per rank" if c.num_kv_heads >= plan.tp
                  else f"replicated, each shared by {plan.tp // c.num_kv_heads} ranks"))
    vocab = padded_vocab(c.vocab_size, plan.tp)
    lines = [
        f"model: {source} ({c.model_type}), {c.num_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_heads} heads, vocab {c.vocab_size}",
        f"plan: tp={plan.tp} x pp={plan.pp} = {plan.world_size} ranks, {plan.dtype} weights, "
        f"KV cache {plan.kv_cache_dtype}, {plan.num_kv_blocks} blocks of {plan.block_size} tokens "
        f"(max batch {plan.max_batch_size} x {plan.max_seq_len} tokens)",
        f"{kv_note}; vocab {c.vocab_size} padded to {vocab} ({vocab // plan.tp} rows per rank)",
        f"layers per stage: {', '.join(map(str, plan.layer_counts))}",
        *(_experts(c, plan) if c.moe else []),
        "",
    ]
    columns = list(plan.ranks[0].memory)
    experts = ["experts"] if c.moe else []
    rows = [["rank", "tp", "pp", "layers", *experts, *columns, "total"]]
    for r in plan.ranks:
        m = plan.mapping(r.rank)
        held = [_span(*r.experts) + (f" ({m.moe_tp_rank + 1}/{m.moe_tp} of each)" if m.moe_tp > 1 else "")
                ] if c.moe else []
        rows.append([str(r.rank), str(r.tp_rank), str(r.pp_rank), f"{r.layers[0]}-{r.layers[1] - 1}", *held,
                     *(human_bytes(r.memory[k]) for k in columns), human_bytes(r.total_bytes)])
    lines += [_table(rows), "", *_nodes(plan, gpus_per_node), _table(_weight_patterns(plan)), ""]
    lines.append("memory: weights exact; KV cache at max batch x max length; activations estimated")
    if plan.gpu_mem_bytes is not None:
        largest = plan.largest_rank()
        if plan.fits:
            lines.append(f"fits: yes, largest rank needs {human_bytes(largest.total_bytes)} of "
                         f"{human_bytes(plan.gpu_mem_bytes)}")
        else:
            lines.append(f"fits: NO, rank {largest.rank} needs {human_bytes(largest.total_bytes)} > "
                         f"{human_bytes(plan.gpu_mem_bytes)} per GPU")
            if suggestion is None:
                lines.append("no layout up to 256 GPUs fits")
            else:
                ep = f", ep={suggestion.ep}" if c.moe else ""
                lines.append(f"fewest GPUs that fit: tp={suggestion.tp} x pp={suggestion.pp}{ep} "
                             f"({suggestion.world_size} GPUs)")
    return "\n".join(lines)
