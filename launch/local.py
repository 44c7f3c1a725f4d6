"""Executors for jobs that no launcher started: a one-rank engine runs in this process alone;
otherwise rank 0 starts ranks 1..N-1 on this host and makes sure they end with it: on normal
exit, on error, on Ctrl-C or SIGTERM (even while rank 0 is blocked inside a collective), when a
rank dies, and when rank 0 itself is killed."""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys

from dist_runtime.engine import Engine
from dist_runtime.executor import Executor
from dist_runtime.rank_info import RankInfo
from dist_runtime.runtime_config import RuntimeConfig
from launch.rank_info import spawned_env
from launch.watch import StartupWatch

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends SIGTERM when rank 0 goes, however it goes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: rank 0 still ends its workers on every path it survives


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcessExecutor(Executor):
    """A one-rank engine: rank 0 is the whole job."""

    def _launch(self) -> RankInfo:
        return RankInfo(0, 1)


class SpawnedExecutor(StartupWatch, Executor):
    """Ranks 1..N-1 as child processes running `python -m launch.worker CONFIG` (the job's
    RuntimeConfig as JSON), each told its RankInfo in the environment."""

    def __init__(self, config: RuntimeConfig, engine: Engine) -> None:
        super().__init__(config, engine)
        self.procs: list[subprocess.Popen] = []

    def _launch(self) -> RankInfo:
        world, port, secret = self.engine.world_size, free_port(), secrets.token_hex(32)
        cmd = [sys.executable, "-m", "launch.worker", self.config.to_json()]
        for rank in range(1, world):
            info = RankInfo(rank, world, rank, world, master_port=port, transport="tcp", secret=secret)
            self.procs.append(subprocess.Popen(cmd, env={**os.environ, **spawned_env(info)},
                                               preexec_fn=_die_with_parent))
        self._start_watch("dist-runtime-workers")
        return RankInfo(0, world, 0, world, master_port=port, transport="tcp", secret=secret)

    def _joined(self) -> None:
        self.hand_over()

    def _ended(self) -> str | None:
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                return f"rank {rank} exited with code {proc.returncode}"
        return None

    def _end_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()

    def kill(self) -> None:
        """SIGKILL every rank still running (a stopped or hung one too); from any thread."""
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def _reap(self, timeout_s: float) -> None:
        self.stopping = True
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._restore_signals()
