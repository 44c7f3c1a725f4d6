"""Which Executor runs a job: decided here and nowhere else."""

from __future__ import annotations

import sys

from dist_runtime.engine import Engine
from dist_runtime.executor import Executor
from dist_runtime.runtime_config import RuntimeConfig
from launch.local import InProcessExecutor, SpawnedExecutor
from launch.rank_info import from_environment
from launch.spmd import SpmdExecutor, serve_other_rank


def executor_for(config: RuntimeConfig, engine: Engine) -> Executor:
    """Under an external launcher (mpirun, srun), rank 0's side of its ranks; a rank other than
    0 has nothing to drive, so it serves rank 0's calls here and then ends the process, which
    is what `LLM(...)` does on such a rank. With no launcher: this process alone for a one-rank
    engine, else ranks 1..N-1 spawned on this host or started as Ray actors (config.launcher)."""
    code = serve_other_rank(config)
    if code is not None:
        sys.exit(code)
    info = from_environment()
    if info is not None:
        return SpmdExecutor(config, engine, info)
    if engine.world_size == 1:
        return InProcessExecutor(config, engine)
    if config.launcher == "ray":
        from launch.ray import RayExecutor  # ray is an optional extra

        return RayExecutor(config, engine)
    return SpawnedExecutor(config, engine)
