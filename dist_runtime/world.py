"""Joining the job: open this rank's Communicator, load its ModelRunner, agree that every
rank is ready. Nothing here knows which launcher started the process; RankInfo says it all."""

from __future__ import annotations

import gc
import logging
import os
import secrets
import socket
import threading

import torch

from dist_runtime.comm.address import local_address
from dist_runtime.comm.auth import AuthError
from dist_runtime.comm.base import Communicator
from dist_runtime.comm.gloo import GlooCommunicator
from dist_runtime.comm.solo import SoloCommunicator
from dist_runtime.engine import Engine
from dist_runtime.errors import DistRuntimeError, EngineError
from dist_runtime.liveness import Heartbeat, Monitor, exit_process
from dist_runtime.mapping import Mapping
from dist_runtime.model_runner import ModelRunner
from dist_runtime.rank_info import RankInfo
from dist_runtime.runtime_config import RuntimeConfig
from dist_runtime.worker import Worker, serve

log = logging.getLogger(__name__)


def open_communicator(info: RankInfo, mapping: Mapping, device: str = "cpu") -> Communicator:
    """Solo for one rank; MPI under an MPI launcher, else gloo over TCP; on GPUs, NCCL for
    tensors with that CPU communicator kept for control messages."""
    if info.world_size == 1:
        return SoloCommunicator(mapping)
    if info.transport == "mpi":
        from dist_runtime.comm.mpi import MpiCommunicator

        control = MpiCommunicator(mapping)
    elif not info.secret:
        raise AuthError(f"ranks that meet over TCP need the job's secret and rank {info.rank} has none "
                        "(its launcher gives every rank the same one)")
    else:
        control = GlooCommunicator(mapping, info.master_addr, info.master_port, info.secret)
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


def watch(comm: Communicator, info: RankInfo, timeout_s: float) -> Monitor | Heartbeat:
    """Start this rank's side of the liveness watch: rank 0's monitor, which tells the others
    where to check in, or another rank's heartbeat. Without a secret from the launcher (MPI),
    rank 0 makes one and sends it over the launcher's links."""
    if info.world_size == 1:
        return Monitor(0, 1, timeout_s)
    secret = info.secret or comm.broadcast_object(secrets.token_hex(32) if info.rank == 0 else None)
    host = _monitor_host(comm, info)
    if info.rank == 0:
        monitor = Monitor(0, info.world_size, timeout_s)
        comm.broadcast_object(monitor.listen(host, secret))
        return monitor
    heartbeat = Heartbeat(info.rank, info.world_size, timeout_s)
    heartbeat.check_in(comm.broadcast_object(None), secret)
    return heartbeat


def _monitor_host(comm: Communicator, info: RankInfo) -> str | None:
    """Where rank 0's monitor listens (None on other ranks): the address the ranks meet at; under
    MPI, loopback when every rank runs on rank 0's host, else its outward address."""
    if info.transport == "tcp":
        return info.master_addr
    hosts = comm.gather_object(socket.gethostname())
    if info.rank != 0:
        return None
    return "127.0.0.1" if set(hosts) == {hosts[0]} else local_address()


def join(engine: Engine, info: RankInfo, config: RuntimeConfig) -> tuple[ModelRunner, Monitor | Heartbeat]:
    """This rank's runner and liveness watch, once every rank has loaded and all agree on the
    KV-cache size (the smallest any rank can hold); a rank's load error is raised on rank 0."""
    check_world(engine, info)
    device, verify, kv_cache_fraction = config.device, config.verify, config.kv_cache_fraction
    if device == "cpu":  # ranks sharing a host share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    elif device == "cuda":
        device = f"cuda:{info.local_rank}"
    mapping = engine.plan.mapping(info.rank)
    comm = open_communicator(info, mapping, device)
    log.info("communicator up: %s", type(comm).__name__)
    liveness = watch(comm, info, config.rank_timeout_s)
    if isinstance(liveness, Heartbeat):  # its own verdicts end the process
        return _load(engine, info, mapping, comm, device, verify, kv_cache_fraction), liveness
    # Loading ends in collectives a hung rank would block forever: rank 0's verdict ends this
    # process unless loading unwinds by itself first (a dead rank makes the collectives fail at once).
    backstop = threading.Timer(5.0, lambda: exit_process(f"{liveness.failure}, while loading"))
    backstop.daemon = True
    liveness.on_lost.append(lambda error: backstop.start())
    try:
        runner = _load(engine, info, mapping, comm, device, verify, kv_cache_fraction)
    except BaseException as e:
        verdict = liveness.explain(e)
        if verdict is e:
            raise
        raise verdict from e
    finally:
        liveness.on_lost.clear()
        backstop.cancel()
    return runner, liveness


def _load(engine: Engine, info: RankInfo, mapping: Mapping, comm: Communicator, device: str, verify: bool,
          kv_cache_fraction: float) -> ModelRunner:
    runner, error = None, None
    try:
        runner = ModelRunner(engine, mapping, comm, device, verify, kv_cache_fraction)
    except DistRuntimeError as e:
        error = f"rank {info.rank}: {e}"
    log.info("loaded; %s KV blocks fit", runner.num_blocks if runner else error)
    reports = comm.gather_object((error, runner.num_blocks if runner else 0))
    num_blocks = None
    if info.rank == 0:
        errors = [e for e, _ in reports if e]
        num_blocks = None if errors else min(n for _, n in reports)
    num_blocks = comm.broadcast_object(num_blocks)
    if num_blocks is None:
        raise EngineError("; ".join(errors) if info.rank == 0 else error or "another rank failed to load")
    runner.allocate(num_blocks)
    # Start-up's objects (modules, kernels, graphs) live as long as the runner: kept out of the
    # collector's sight, a full collection mid-run does not walk them (walking them holds a 128/128
    # bench's host 80 ms, the GPU idle meanwhile; BENCHMARKS.md). release() undoes it.
    gc.collect()
    gc.freeze()
    log.info("ready with %d KV blocks", num_blocks)
    return runner


def run_worker(config: RuntimeConfig, info: RankInfo) -> None:
    """A rank other than 0: join, then run what rank 0 asks (Worker) until it says stop;
    signals wait for rank 0 to end the job."""
    runner, liveness = join(Engine.load(config.engine_dir).serving(config), info, config)
    liveness.defer_signals()
    try:
        serve(Worker(runner), runner.comm, liveness.activity)
    finally:
        liveness.close()
        runner.release()  # before the communicators: see ModelRunner.release
        runner.comm.close()
