"""The loop of every rank but 0: each (method, args) rank 0 broadcasts runs as that Worker
method, a result goes back through gather only when rank 0 waits for it, and stop ends it."""

from __future__ import annotations

from types import SimpleNamespace

from dist_runtime.liveness import Activity
from dist_runtime.worker import Worker, serve


class Runner:
    def __init__(self) -> None:
        self.steps = []

    def run(self, step) -> None:
        self.steps.append(step)

    def stats(self) -> dict:
        return {"rank": 1}


class Comm:
    """Hands out rank 0's messages in order and keeps what this rank gathers."""

    def __init__(self, messages: list) -> None:
        self.messages, self.gathered = list(messages), []

    def broadcast_object(self, obj):
        return self.messages.pop(0)

    def gather_object(self, obj) -> None:
        self.gathered.append(obj)


def test_each_call_runs_its_worker_method_and_replies_only_when_rank0_waits():
    step, runner = SimpleNamespace(num_seqs=1, num_tokens=3), Runner()
    comm = Comm([("run", (step,), False), ("ping", (), False), ("stats", (), True), ("run", (step,), False),
                 ("stop", (), False), ("run", (step,), False)])
    serve(Worker(runner), comm, Activity())
    assert runner.steps == [step, step]
    assert comm.gathered == [{"rank": 1}]
    assert len(comm.messages) == 1  # nothing is taken after stop
