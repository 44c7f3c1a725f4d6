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


def open_communicator(info: RankInfo, mapping: Mapping, device: str = "cpu") -> Communicator:
    """Solo for one rank; MPI under an MPI launcher, else gloo over TCP; on GPUs, NCCL for
    tensors with that CPU communicator kept for control messages."""
    if info.world_size == 1:
        from dist_runtime.comm.solo import SoloCommunicator

        return SoloCommunicator(mapping)
    if info.transport == "mpi":
        from dist_runtime.comm.mpi import MpiCommunicator

        control = MpiCommunicator(mapping)
    else:
        from dist_runtime.comm.gloo import GlooCommunicator

        control = GlooCommunicator(mapping, info.master_addr, info.master_port)
    if not device.startswith("cuda"):
        return control
    from dist_runtime.comm.nccl import NcclCommunicator

    torch.cuda.set_device(device)
    return NcclCommunicator(mapping, control)


def check_world(engine: Engine, info: RankInfo) -> None:
    plan = engine.plan
    if info.world_size != engine.world_size:
        raise EngineError(f"engine {engine.path} was built for {engine.world_size} ranks (tp={plan.tp} x "
                          f"pp={plan.pp}); this job has {info.world_size} ranks")


def join(engine: Engine, info: RankInfo, device: str = "cpu", verify: bool = True,
         kv_cache_fraction: float = 0.9) -> ModelRunner:
    """This rank's runner, once every rank has loaded and all agree on the KV-cache size (the
    smallest any rank can hold); a rank's load error is raised on rank 0."""
    check_world(engine, info)
    if device == "cpu":  # ranks sharing a host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    elif device == "cuda":
        device = f"cuda:{info.local_rank}"
    mapping = engine.plan.mapping(info.rank)
    comm = open_communicator(info, mapping, device)
    runner, error = None, None
    try:
        runner = ModelRunner(engine, mapping, comm, device, verify, kv_cache_fraction)
    except DistRuntimeError as e:
        error = f"rank {info.rank}: {e}"
    reports = comm.gather_object((error, runner.num_blocks if runner else 0))
    num_blocks = None
    if info.rank == 0:
        errors = [e for e, _ in reports if e]
        num_blocks = None if errors else min(n for _, n in reports)
    num_blocks = comm.broadcast_object(num_blocks)
    if num_blocks is None:
        raise EngineError("; ".join(errors) if info.rank == 0 else error or "another rank failed to load")
    runner.allocate(num_blocks)
    return runner


def run_worker(engine_dir: str, info: RankInfo, device: str = "cpu", verify: bool = True,
               kv_cache_fraction: float = 0.9) -> None:
    """A rank other than 0: join, then run Steps until rank 0 says stop."""
    engine = Engine.load(engine_dir)
    runner = join(engine, info, device, verify, kv_cache_fraction)
    try:
        serve_steps(runner, runner.comm)
    finally:
        runner.comm.close()
