"""A rank's side of Executor.call: each operation that rank 0 asks of every rank is one method
of Worker, and on every rank but 0 `serve` runs them in the order rank 0 sends them."""

from __future__ import annotations

import logging

from dist_runtime.comm.base import Communicator
from dist_runtime.liveness import Activity
from dist_runtime.model_runner import ModelRunner
from dist_runtime.step import Step

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.serving = True

    def run(self, step: Step) -> None:
        """This rank's share of a step (rank 0 launches its own share itself, without waiting)."""
        log.debug("step of %d sequences, %d tokens", step.num_seqs, step.num_tokens)
        self.runner.run(step)

    def stats(self) -> dict:
        return self.runner.stats()

    def ping(self) -> None:
        """Nothing: an idle rank 0 sends it now and then, so that no transport times out a rank
        waiting for work."""

    def stop(self) -> None:
        self.serving = False


def serve(worker: Worker, comm: Communicator, activity: Activity) -> None:
    """The loop of every rank but 0: run each (method, args) that rank 0 broadcasts, and send the
    result back through gather when rank 0 waits for it, until it says stop."""
    while worker.serving:
        method, args, reply = comm.broadcast_object(None)
        with activity:
            result = getattr(worker, method)(*args)
        if reply:
            comm.gather_object(result)
