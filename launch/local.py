"""The embedded launcher: with no launcher around, rank 0 starts ranks 1..N-1 on this host
and makes sure they end with it: on normal exit, on error, on Ctrl-C or SIGTERM (even while
rank 0 is blocked inside a collective), when a worker dies, and when rank 0 itself is killed."""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys

from dist_runtime.rank_info import RankInfo
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


class LocalWorkers(StartupWatch):
    """Ranks 1..world_size-1 as child processes running `launch.worker ENGINE_DIR`."""

    def __init__(self, engine_dir: str, world_size: int, worker_args: list[str] | None = None) -> None:
        port, secret = free_port(), secrets.token_hex(32)
        self.rank0 = RankInfo(0, world_size, 0, world_size, master_port=port, transport="tcp", secret=secret)
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, world_size):
            info = RankInfo(rank, world_size, rank, world_size, master_port=port, transport="tcp", secret=secret)
            cmd = [sys.executable, "-m", "launch.worker", str(engine_dir), *(worker_args or [])]
            self.procs.append(subprocess.Popen(cmd, env={**os.environ, **spawned_env(info)},
                                               preexec_fn=_die_with_parent))
        self._start_watch("dist-runtime-workers")

    def _ended(self) -> str | None:
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                return f"rank {rank} exited with code {proc.returncode}"
        return None

    def _end_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()

    def stop(self, timeout_s: float = 10.0) -> list[int]:
        """Wait for the workers (they leave on rank 0's shutdown), end any left; their exit codes."""
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
        return [proc.returncode for proc in self.procs]

    def kill_now(self) -> None:
        """SIGKILL every worker still running (a stopped or hung one too); from any thread."""
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def kill(self) -> None:
        self.stopping = True
        self._end_all()
        self.stop(timeout_s=0)
