"""An engine's plan, as engine.json holds it: the TP x PP layout, the sizes it was planned for,
and per rank its layers, the slice of every weight it holds and the memory they take
(sharding/planner.py makes one)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dist_runtime.errors import PlanError
from dist_runtime.mapping import Mapping
from dist_runtime.quantization import FP8, INT4_DTYPES

# Engine dtypes: (dtype of activations and unquantized weights, bytes per quantized GEMM weight or None;
# int4 engines pack two weights a byte, with tables per group: the planner counts them itself)
DTYPES: dict[str, tuple[torch.dtype, int | None]] = {
    "fp32": (torch.float32, None), "fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
    "fp8": (torch.bfloat16, 1), "int8wo": (torch.bfloat16, 1),
    **{name: (activations, None) for name, activations in INT4_DTYPES.items()},
}
KV_DTYPES = {"auto": None, "fp8": FP8}  # None: the activations' dtype


@dataclasses.dataclass
class WeightSlice:
    name: str  # parameter name in the engine
    shape: list[int]  # this rank's shape
    parallel: str  # column, row, vocab or replicated
    sources: list[str]  # checkpoint tensors it is cut from (several when fused)


@dataclasses.dataclass
class RankPlan:
    rank: int
    tp_rank: int
    pp_rank: int
    layers: list[int]  # [first, last + 1)
    memory: dict[str, int]  # bytes: weights, kv_cache, activations (+ runtime when sized for a GPU)
    weights: list[WeightSlice]
    experts: list[int] | None = None  # [first, last + 1) of a mixture's experts it holds (a slice of each)

    @property
    def total_bytes(self) -> int:
        return sum(self.memory.values())


@dataclasses.dataclass
class Plan:
    tp: int
    pp: int
    dtype: str
    kv_cache_dtype: str
    layer_counts: list[int]
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    block_size: int
    num_kv_blocks: int
    gpu_mem_bytes: int | None
    ranks: list[RankPlan]
    ep: int = 1  # expert-parallel groups of each TP group (Mapping.ep)
    expert_exchange: str = "all-reduce"  # how a TP group's expert outputs meet (layers/moe.py)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def layer_range(self, pp_rank: int) -> range:
        start = sum(self.layer_counts[:pp_rank])
        return range(start, start + self.layer_counts[pp_rank])

    def mapping(self, rank: int = 0) -> Mapping:
        return Mapping(self.tp, self.pp, rank, self.ep)

    @property
    def kv_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.kv_cache_dtype] or DTYPES[self.dtype][0]

    @property
    def fits(self) -> bool:
        return self.gpu_mem_bytes is None or all(r.total_bytes <= self.gpu_mem_bytes for r in self.ranks)

    def with_limits(self, positions: int, max_batch_size: int | None = None, max_seq_len: int | None = None,
                    max_num_tokens: int | None = None) -> Plan:
        """This plan serving other limits than it was built with (None: its own): none of them is
        in the weights, so they are the start's to choose. `positions`: the model's, past which
        no sequence may grow. A CPU rank's KV cache is sized by them (a GPU's by its memory)."""
        batch = max_batch_size or self.max_batch_size
        seq_len = max_seq_len or self.max_seq_len
        if seq_len > positions:
            raise PlanError(f"max_seq_len {seq_len} exceeds the model's {positions} positions")
        tokens = max_num_tokens or (self.max_num_tokens if (batch, seq_len) == (self.max_batch_size, self.max_seq_len)
                                    else min(8192, batch * seq_len))
        return dataclasses.replace(self, max_batch_size=batch, max_seq_len=seq_len, max_num_tokens=tokens,
                                   num_kv_blocks=batch * -(-seq_len // self.block_size))

    def largest_rank(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.total_bytes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        ranks = [RankPlan(**{**r, "weights": [WeightSlice(**w) for w in r["weights"]]}) for r in data["ranks"]]
        return cls(**{**data, "ranks": ranks})
