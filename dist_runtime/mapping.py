"""Rank arithmetic in one place: which TP slice and which PP stage a rank holds, and for a
mixture of experts, which experts and which slice of each."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

Ids = TypeVar("Ids")  # an int, or a tensor of ints


@dataclasses.dataclass(frozen=True)
class Mapping:
    """`rank = pp_rank * tp + tp_rank`. Every module asks this object; none recomputes it.

    Expert parallelism (`ep`, as TensorRT-LLM's moe_ep_size) divides a TP group: attention
    stays split over all `tp` ranks, while the experts form `ep` groups of whole experts, and
    each expert's weights are split over the `moe_tp = tp // ep` ranks of its group. TP ranks
    [g * moe_tp, (g + 1) * moe_tp) hold expert group g."""

    tp: int = 1
    pp: int = 1
    rank: int = 0
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.ep < 1:
            raise ValueError(f"tp, pp and ep must be >= 1, got tp={self.tp} pp={self.pp} ep={self.ep}")
        if self.tp % self.ep:
            raise ValueError(f"ep={self.ep} does not divide tp={self.tp}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def moe_tp(self) -> int:
        """Ranks each expert's weights are split over."""
        return self.tp // self.ep

    @property
    def ep_rank(self) -> int:
        """This rank's expert group."""
        return self.ep_rank_of(self.tp_rank)

    @property
    def moe_tp_rank(self) -> int:
        """Which slice of each of its group's experts this rank holds."""
        return self.tp_rank % self.moe_tp

    def ep_rank_of(self, tp_rank: int) -> int:
        """The expert group TP rank `tp_rank` holds."""
        return tp_rank // self.moe_tp

    def experts(self, num_experts: int) -> range:
        """The experts (global ids) this rank's group holds."""
        per_group = num_experts // self.ep
        return range(self.ep_rank * per_group, (self.ep_rank + 1) * per_group)

    def expert_group(self, expert: Ids, num_experts: int) -> Ids:
        """The group holding expert `expert` (an id, or a tensor of them)."""
        return expert // (num_experts // self.ep)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def tp_group(self) -> list[int]:
        """Global ranks sharing this rank's PP stage."""
        start = self.pp_rank * self.tp
        return list(range(start, start + self.tp))

    def prev_stage_rank(self) -> int:
        """The rank of the previous stage holding the same TP slice."""
        return self.rank - self.tp

    def next_stage_rank(self) -> int:
        return self.rank + self.tp

    def sampler_rank(self) -> int:
        """The rank that samples: TP rank 0 of the last stage."""
        return (self.pp - 1) * self.tp

    def of_rank(self, rank: int) -> Mapping:
        return dataclasses.replace(self, rank=rank)

    def all_ranks(self) -> list[Mapping]:
        return [self.of_rank(r) for r in range(self.world_size)]
