"""Who this process is in the job: the one place that reads launcher environment variables."""

from __future__ import annotations

import dataclasses
import os

# Set by the local spawner for the processes it starts (and by later launchers that meet over TCP).
ENV_RANK = "DIST_RUNTIME_RANK"
ENV_WORLD = "DIST_RUNTIME_WORLD_SIZE"
ENV_LOCAL_RANK = "DIST_RUNTIME_LOCAL_RANK"
ENV_LOCAL_WORLD = "DIST_RUNTIME_LOCAL_WORLD_SIZE"
ENV_ADDR = "DIST_RUNTIME_MASTER_ADDR"
ENV_PORT = "DIST_RUNTIME_MASTER_PORT"


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


def _mpi(env: dict[str, str]) -> RankInfo | None:
    """Open MPI and MPICH (hydra) both export rank, size and node-local rank."""
    for rank, size, local, local_size in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ):
        if rank in env and size in env:
            return RankInfo(int(env[rank]), int(env[size]), int(env.get(local, 0)), int(env.get(local_size, 1)),
                            transport="mpi")
    return None


def _spawned(env: dict[str, str]) -> RankInfo | None:
    if ENV_RANK not in env:
        return None
    return RankInfo(int(env[ENV_RANK]), int(env[ENV_WORLD]), int(env.get(ENV_LOCAL_RANK, env[ENV_RANK])),
                    int(env.get(ENV_LOCAL_WORLD, env[ENV_WORLD])), master_addr=env[ENV_ADDR],
                    master_port=int(env[ENV_PORT]), transport="tcp")


def from_environment(env: dict[str, str] | None = None) -> RankInfo | None:
    """This process's RankInfo if a launcher started it, else None (the caller may spawn)."""
    env = dict(os.environ) if env is None else env
    return _spawned(env) or _mpi(env)


def spawned_env(info: RankInfo) -> dict[str, str]:
    """The environment that tells a spawned process its RankInfo."""
    return {ENV_RANK: str(info.rank), ENV_WORLD: str(info.world_size), ENV_LOCAL_RANK: str(info.local_rank),
            ENV_LOCAL_WORLD: str(info.local_world_size), ENV_ADDR: info.master_addr,
            ENV_PORT: str(info.master_port)}
