"""Joining the job: open this rank's Communicator, load its ModelRunner, agree that every
rank is ready. Nothing here knows which launcher started the process; RankInfo says it all."""

from __future__ import annotations

import os

import torch

from dist_runtime.comm.base import Communicator
from dist_runtime.coordinator import serve_steps
from dist_runtime.engine import Engine
from dist_runtime.errors import DistRuntimeError, EngineError
from dist_runtime.mapping import Mapping
from dist_runtime.model_runner import ModelRunner
from launch.rank_info import RankInfo


def open_communicator(info: RankInfo, mapping: Mapping) -> Communicator:
    if info.world_size == 1:
        from dist_runtime.comm.solo import SoloCommunicator

        return SoloCommunicator(mapping)
    if info.transport == "mpi":
        from dist_runtime.comm.mpi import MpiCommunicator

        return MpiCommunicator(mapping)
    from dist_runtime.comm.gloo import GlooCommunicator

    return GlooCommunicator(mapping, info.master_addr, info.master_port)


def check_world(engine: Engine, info: RankInfo) -> None:
    plan = engine.plan
    if info.world_size != engine.world_size:
        raise EngineError(f"engine {engine.path} was built for {engine.world_size} ranks (tp={plan.tp} x "
                          f"pp={plan.pp}); this job has {info.world_size} ranks")


def join(engine: Engine, info: RankInfo, device: str = "cpu", verify: bool = True) -> ModelRunner:
    """This rank's runner, once every rank has loaded; a rank's load error is raised on rank 0."""
    check_world(engine, info)
    if device == "cpu":  # ranks sharing a host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    mapping = engine.plan.mapping(info.rank)
    comm = open_communicator(info, mapping)
    runner, error = None, None
    try:
        runner = ModelRunner(engine, mapping, comm, device, verify)
    except DistRuntimeError as e:
        error = f"rank {info.rank}: {e}"
    errors = comm.gather_object(error)
    if info.rank == 0 and any(errors):
        raise EngineError("; ".join(e for e in errors if e))
    if error:
        raise EngineError(error)
    return runner


def run_worker(engine_dir: str, info: RankInfo, device: str = "cpu", verify: bool = True) -> None:
    """A rank other than 0: join, then run Steps until rank 0 says stop."""
    engine = Engine.load(engine_dir)
    runner = join(engine, info, device, verify)
    try:
        serve_steps(runner, runner.comm)
    finally:
        runner.comm.close()
