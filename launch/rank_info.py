"""Who this process is in the job: the one place that reads launcher environment variables."""

from __future__ import annotations

import os
import re
import stat
import subprocess

from dist_runtime.comm.auth import AuthError
from dist_runtime.rank_info import RankInfo

# Set by the local spawner for the processes it starts (and by later launchers that meet over TCP).
ENV_RANK = "DIST_RUNTIME_RANK"
ENV_WORLD = "DIST_RUNTIME_WORLD_SIZE"
ENV_LOCAL_RANK = "DIST_RUNTIME_LOCAL_RANK"
ENV_LOCAL_WORLD = "DIST_RUNTIME_LOCAL_WORLD_SIZE"
ENV_ADDR = "DIST_RUNTIME_MASTER_ADDR"
ENV_PORT = "DIST_RUNTIME_MASTER_PORT"
# The job's secret, which ranks that meet over TCP prove to each other before anything else is said;
# or the path of a file holding it that only its owner can open.
ENV_SECRET = "DIST_RUNTIME_JOB_SECRET"
ENV_SECRET_FILE = "DIST_RUNTIME_JOB_SECRET_FILE"


class SecretError(ValueError):
    """The job's secret file is unreadable, empty, or open to other users."""


def _mpi(env: dict[str, str]) -> RankInfo | None:
    """Open MPI and MPICH (hydra) both export rank, size and node-local rank; `srun --mpi=pmi2`
    exports PMI_RANK and PMI_SIZE but no node-local rank, which Slurm's own variables then give."""
    for rank, size, local, local_size in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ):
        if rank in env and size in env:
            if local not in env and _srun_step(env) is not None:
                return RankInfo(int(env[rank]), int(env[size]), *_slurm_local(env), transport="mpi")
            return RankInfo(int(env[rank]), int(env[size]), int(env.get(local, 0)), int(env.get(local_size, 1)),
                            transport="mpi")
    return None


def _srun_step(env: dict[str, str]) -> int | None:
    """The step id of a task that srun started, else None: the batch script, salloc's shell and the
    extern step carry SLURM_PROCID and SLURM_NTASKS too, but no step id or a special one (0xfffffffa+)."""
    step = env.get("SLURM_STEP_ID", "")
    return int(step) if step.isdigit() and int(step) < 0xFFFFFFF0 and "SLURM_PROCID" in env else None


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed count list: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"unreadable Slurm tasks-per-node list {spec!r} (expected forms like '2(x3),1')")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def _slurm_local(env: dict[str, str]) -> tuple[int, int]:
    node = int(env.get("SLURM_NODEID", 0))
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    return int(env.get("SLURM_LOCALID", 0)), tasks_per_node(spec)[node] if spec else 1


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list; "gpu[03-04],cpu1" needs scontrol to expand."""
    if "[" not in nodelist:
        return nodelist.split(",")[0]
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def slurm_port(job_id: int, step_id: int) -> int:
    """A port every task of a step derives alike: steps of one job differ, and 20000-29999 stays below
    Linux's ephemeral ports (32768+) and above Ray's worker ports (10002-19999)."""
    return 20000 + (job_id * 16 + step_id) % 10000


def _slurm(env: dict[str, str]) -> RankInfo | None:
    """A task that srun started: rank 0 is the step's first task, on the step's first node."""
    step = _srun_step(env)
    if step is None:
        return None
    port = env.get(ENV_PORT) or slurm_port(int(env["SLURM_JOB_ID"]), step)
    addr = env.get(ENV_ADDR) or first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    rank = int(env["SLURM_PROCID"])
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env["SLURM_NPROCS"])
    return RankInfo(rank, world, *_slurm_local(env), node_id=int(env.get("SLURM_NODEID", 0)), master_addr=addr,
                    master_port=int(port), transport="tcp", secret=job_secret(env, rank, world))


def _spawned(env: dict[str, str]) -> RankInfo | None:
    if ENV_RANK not in env:
        return None
    rank, world = int(env[ENV_RANK]), int(env[ENV_WORLD])
    return RankInfo(rank, world, int(env.get(ENV_LOCAL_RANK, rank)), int(env.get(ENV_LOCAL_WORLD, world)),
                    master_addr=env[ENV_ADDR], master_port=int(env[ENV_PORT]), transport="tcp",
                    secret=job_secret(env, rank, world))


def job_secret(env: dict[str, str], rank: int, world_size: int) -> str:
    """The job's secret that the launcher put in the environment; "" for a rank alone, which
    meets no other."""
    if env.get(ENV_SECRET):
        return env[ENV_SECRET]
    path = env.get(ENV_SECRET_FILE)
    if not path:
        if world_size > 1:
            raise AuthError(f"ranks that meet over TCP need the job's secret and rank {rank} has none: "
                            f"export {ENV_SECRET} (the same random string for every rank, e.g. "
                            f"$(openssl rand -hex 32)) or {ENV_SECRET_FILE} (a file only you can read) in "
                            "the job's environment")
        return ""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:  # another user could read it, or change it
            raise SecretError(f"{ENV_SECRET_FILE}={path} is open to other users (mode {mode:04o}); "
                              f"make it readable by you alone: chmod 600 {path}")
        with open(path) as f:
            secret = f.read().strip()
    except OSError as e:
        raise SecretError(f"cannot read the job's secret from {ENV_SECRET_FILE}={path}: {e}") from e
    if not secret:
        raise SecretError(f"{ENV_SECRET_FILE}={path} is empty")
    return secret


def from_environment(env: dict[str, str] | None = None) -> RankInfo | None:
    """This process's RankInfo if a launcher started it, else None (the caller may spawn)."""
    env = dict(os.environ) if env is None else env
    # MPI before Slurm: mpirun inside an allocation starts its ranks through srun, one task per node
    return _spawned(env) or _mpi(env) or _slurm(env)


def spawned_env(info: RankInfo) -> dict[str, str]:
    """The environment that tells a spawned process its RankInfo."""
    return {ENV_RANK: str(info.rank), ENV_WORLD: str(info.world_size), ENV_LOCAL_RANK: str(info.local_rank),
            ENV_LOCAL_WORLD: str(info.local_world_size), ENV_ADDR: info.master_addr,
            ENV_PORT: str(info.master_port), ENV_SECRET: info.secret}
