"""Jobs whose ranks an external launcher started (mpirun, srun, or anyone who sets our
variables): every rank runs the same command; rank 0 drives the job through SpmdExecutor, and
every other rank serves rank 0's calls (launch.worker.serve_rank) instead."""

from __future__ import annotations

from dist_runtime.engine import Engine
from dist_runtime.executor import Executor
from dist_runtime.rank_info import RankInfo
from dist_runtime.runtime_config import RuntimeConfig
from launch.rank_info import from_environment
from launch.worker import serve_rank


class SpmdExecutor(Executor):
    """Rank 0's side: the other ranks are there already, and the launcher ends them when rank 0 exits."""

    def __init__(self, config: RuntimeConfig, engine: Engine, info: RankInfo) -> None:
        super().__init__(config, engine)
        self.info = info

    def _launch(self) -> RankInfo:
        return self.info


def serve_other_rank(config: RuntimeConfig) -> int | None:
    """Under an external launcher every rank runs the same command: on a rank other than 0,
    serve rank 0's calls until it stops the job and return the exit code; None on rank 0 (or
    with no launcher), which drives."""
    info = from_environment()
    return None if info is None or info.rank == 0 else serve_rank(config, info)
