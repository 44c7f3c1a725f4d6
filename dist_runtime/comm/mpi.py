"""The CPU communicator for ranks started by an MPI launcher (mpi4py).

Every wait polls a non-blocking request with short sleeps: MPI's blocking calls spin at full
speed, which starves the working ranks when there are more ranks than cores.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from dist_runtime.comm.base import Communicator, gather_last_dim, split_message, unpack_message
from dist_runtime.mapping import Mapping

SPIN_POLLS = 200  # polls before the first sleep: short waits stay fast
MAX_SLEEP_S = 2e-4
_GATHER_TAG = 77


def wait(request: MPI.Request) -> Any:
    """Complete `request`; returns the received object for pickle-based (lowercase) requests."""
    for _ in range(SPIN_POLLS):
        done, obj = request.test()
        if done:
            return obj
    delay = 1e-5
    while True:
        done, obj = request.test()
        if done:
            return obj
        time.sleep(delay)
        delay = min(2 * delay, MAX_SLEEP_S)


def _wire(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view sharing the tensor's memory (bfloat16 travels as raw 16-bit words)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


class MpiCommunicator(Communicator):
    def __init__(self, mapping: Mapping, world: MPI.Comm | None = None) -> None:
        super().__init__(mapping)
        self.world = world or MPI.COMM_WORLD
        self.tp_comm = self.world.Split(color=mapping.pp_rank, key=mapping.tp_rank)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        # MPI has no bfloat16 sum; reduce in float32 and write back.
        work = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
        work = work.contiguous()
        wait(self.tp_comm.Iallreduce(MPI.IN_PLACE, work.numpy(), op=MPI.SUM))
        if work.data_ptr() != tensor.data_ptr():
            tensor.copy_(work)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.mapping.tp, *tensor.shape))
        wait(self.tp_comm.Iallgather(_wire(tensor), _wire(out)))
        return gather_last_dim(list(out.unbind(0)))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        wait(self.world.Isend(_wire(tensor.contiguous()), dest=dst))

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        wait(self.world.Irecv(_wire(tensor), source=src))
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        root = self.world.rank == 0
        first, rest = split_message(obj if root else None, root)
        wait(self.world.Ibcast(first.numpy(), root=0))
        size, payload = unpack_message(first)
        if size > len(payload):
            rest = rest if rest is not None else torch.empty(size - len(payload), dtype=torch.uint8)
            wait(self.world.Ibcast(rest.numpy(), root=0))
            payload = payload + rest.numpy().tobytes()
        return obj if root else pickle.loads(payload)

    def gather_object(self, obj: Any) -> list[Any] | None:
        if self.world.rank != 0:
            wait(self.world.isend(obj, dest=0, tag=_GATHER_TAG))
            return None
        out = [obj]
        for src in range(1, self.world.size):
            out.append(wait(self.world.irecv(source=src, tag=_GATHER_TAG)))
        return out

    def close(self) -> None:
        self.tp_comm.Free()
