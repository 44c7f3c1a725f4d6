"""Who this process is in the job. A launcher fills it in (launch/); nothing below it knows
which launcher that was."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1
    node_id: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    transport: str = "solo"  # "mpi": an MPI world exists; "tcp": meet at master_addr:port; "solo": alone
    secret: str = dataclasses.field(default="", repr=False)  # "tcp": the job's secret, shared by all its ranks
