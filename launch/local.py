"""The embedded launcher: with no launcher around, rank 0 starts ranks 1..N-1 on this host
and makes sure they end with it: on normal exit, on error, on Ctrl-C or SIGTERM (even while
rank 0 is blocked inside a collective), when a worker dies, and when rank 0 itself is killed."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import threading

from launch.rank_info import RankInfo, spawned_env

_PR_SET_PDEATHSIG = 1
GRACE_S = 5.0  # after a failure, time for rank 0 to unwind by itself before it is ended


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


class LocalWorkers:
    """Ranks 1..world_size-1 as child processes running `launch.worker ENGINE_DIR`, watched by a
    thread. Python runs signal handlers only between bytecodes, so a Ctrl-C that arrives while
    rank 0 waits in a collective is seen through a wakeup fd instead."""

    def __init__(self, engine_dir: str, world_size: int, worker_args: list[str] | None = None) -> None:
        port = free_port()
        self.rank0 = RankInfo(0, world_size, 0, world_size, master_port=port, transport="tcp")
        self.stopping = False
        # Set once every rank has joined: from then on the runtime's liveness watch names lost
        # ranks, and signals reach rank 0's main thread, which is no longer stuck in a collective.
        self.handed_over = False
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, world_size):
            info = RankInfo(rank, world_size, rank, world_size, master_port=port, transport="tcp")
            cmd = [sys.executable, "-m", "launch.worker", str(engine_dir), *(worker_args or [])]
            self.procs.append(subprocess.Popen(cmd, env={**os.environ, **spawned_env(info)},
                                               preexec_fn=_die_with_parent))
        self._signal_r, signal_w = os.pipe()
        os.set_blocking(signal_w, False)
        self._old_wakeup_fd = None
        if threading.current_thread() is threading.main_thread():  # the only thread allowed to set it
            self._old_wakeup_fd = signal.set_wakeup_fd(signal_w)
        self._watcher = threading.Thread(target=self._watch, name="dist-runtime-workers", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self.stopping:
            ready, _, _ = select.select([self._signal_r], [], [], 0.1)
            if ready:
                signals = os.read(self._signal_r, 64)
                if {signal.SIGINT, signal.SIGTERM} & set(signals) and not self.handed_over:
                    return self._fail("interrupted", 130)
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None and not (self.stopping or self.handed_over):
                    return self._fail(f"rank {rank} exited with code {proc.returncode}", 1)

    def _fail(self, why: str, code: int) -> None:
        """End the other workers; if rank 0 is still stuck after the grace period, end it too."""
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        timer = threading.Timer(GRACE_S, self._hard_exit, args=(why, code))
        timer.daemon = True  # a rank 0 that unwinds by itself exits without waiting for it
        timer.start()

    @staticmethod
    def _hard_exit(why: str, code: int) -> None:
        print(f"dist-runtime: {why}; stopping all ranks", file=sys.stderr, flush=True)
        os._exit(code)

    def expect_exit(self) -> None:
        """From now on workers leaving is the plan, not a failure."""
        self.stopping = True

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
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None
        return [proc.returncode for proc in self.procs]

    def kill_now(self) -> None:
        """SIGKILL every worker still running (a stopped or hung one too); from any thread."""
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def kill(self) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        self.stop(timeout_s=0)
