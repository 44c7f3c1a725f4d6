"""How rank 0 starts, asks and ends a job's ranks, whoever starts them. launch/ holds the
implementations (this process alone, spawned child processes, ranks that mpirun or srun
started, Ray actors) and picks one per job (launch.executors.executor_for); nothing above this
interface knows how the ranks were started.

Rank 0 asks every rank to run a Worker method: `call` runs it on rank 0 too and gathers every
rank's result; `post` has only the other ranks run it and waits for nothing. A Step goes out as
one post, while rank 0 launches its own share of it on its runner."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from dist_runtime.engine import Engine
from dist_runtime.liveness import Monitor
from dist_runtime.model_runner import ModelRunner
from dist_runtime.rank_info import RankInfo
from dist_runtime.runtime_config import RuntimeConfig
from dist_runtime.worker import Worker
from dist_runtime.world import join

STOP_TIMEOUT_S = 10.0  # once told to stop, how long the ranks an executor started get to exit


class Executor(ABC):
    def __init__(self, config: RuntimeConfig, engine: Engine) -> None:
        self.config, self.engine = config, engine
        self.runner: ModelRunner | None = None  # rank 0's, once started
        self.monitor: Monitor | None = None  # rank 0's side of the liveness watch, once started
        self._worker: Worker | None = None
        self._stopped = False

    def start(self) -> ModelRunner:
        """Start the other ranks (where this process starts them) and join them as rank 0;
        rank 0's runner, once every rank has loaded."""
        try:
            info = self._launch()
            self.runner, self.monitor = join(self.engine, info, self.config)
        except BaseException:
            self.kill()
            self._reap(0.0)
            raise
        self._worker = Worker(self.runner)
        self._joined()
        return self.runner

    def post(self, method: str, *args: Any) -> None:
        """Every other rank runs `Worker.method(*args)`; rank 0 neither runs it nor waits."""
        self.runner.comm.broadcast_object((method, args, False))

    def call(self, method: str, *args: Any) -> list[Any]:
        """Every rank runs `Worker.method(*args)`, rank 0 here; the results in rank order."""
        comm = self.runner.comm
        comm.broadcast_object((method, args, True))
        return comm.gather_object(getattr(self._worker, method)(*args))

    def stop(self, clean: bool = True) -> None:
        """Rank 0 leaves the job, once no other thread talks to the ranks. With `clean` every
        rank is told to stop and the links close in order; after a failure (a rank lost, a
        broken collective) no rank is spoken to. Then the ranks this executor started get
        STOP_TIMEOUT_S to exit before they are ended. A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self.monitor.leave()  # ranks going away from here on is the plan, not a failure
        try:
            if clean:
                self.post("stop")
                self.runner.release()  # before the communicators: see ModelRunner.release
                self.runner.comm.close()
        finally:
            self.monitor.close()
            self._reap(STOP_TIMEOUT_S)

    @abstractmethod
    def _launch(self) -> RankInfo:
        """Start ranks 1..N-1 where this process starts them; rank 0's RankInfo."""

    def _joined(self) -> None:  # noqa: B027 - a hook for executors that watch their ranks' start
        """Every rank has joined: the liveness watch looks after them from here."""

    def kill(self) -> None:  # noqa: B027 - nothing to end where no rank was started here
        """End every rank this executor started, at once (a hung one too); from any thread.
        Ranks that an external launcher started are its to end, which rank 0's exit tells it."""

    def _reap(self, timeout_s: float) -> None:  # noqa: B027 - as kill
        """Wait up to `timeout_s` for the ranks this executor started to exit, end any left,
        and give back what they held."""
