"""Rank arithmetic in one place: which TP slice and which PP stage a rank holds."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mapping:
    """`rank = pp_rank * tp + tp_rank`. Every module asks this object; none recomputes it."""

    tp: int = 1
    pp: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")
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
        return Mapping(self.tp, self.pp, rank)

    def all_ranks(self) -> list[Mapping]:
        return [self.of_rank(r) for r in range(self.world_size)]
