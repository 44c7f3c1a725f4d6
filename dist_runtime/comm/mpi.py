"""The CPU communicator for ranks started by an MPI launcher (mpi4py).

Every wait polls a non-blocking request with short sleeps: MPI's blocking calls spin at full
speed, which starves the working ranks when there are more ranks than cores.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from dist_runtime.comm.base import Communicator, gather_last_dim
from dist_runtime.mapping import Mapping

SPIN_POLLS = 200  # polls before the first sleep: short waits stay fast
MAX_SLEEP_S = 2e-4
_GATHER_TAG = 77
_CONTROL_TAG = 78
_TENSOR_TAG = 0


# A control message travels as one fixed-size message holding its length and, when it fits
# (as a decode step for hundreds of sequences does), the whole pickle; a larger one needs a
# second message for the rest. Receivers learn the size from the first.
FIRST_MESSAGE_BYTES = 1 << 16


def split_message(obj: Any) -> list[torch.Tensor]:
    """The first buffer and, when the pickle does not fit in it, the remainder."""
    first = torch.zeros(FIRST_MESSAGE_BYTES, dtype=torch.uint8)
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    room = FIRST_MESSAGE_BYTES - 8
    first[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
    head = payload[:room]
    first[8:8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    if len(payload) <= room:
        return [first]
    return [first, torch.frombuffer(bytearray(payload[room:]), dtype=torch.uint8)]


def receive_message(recv: Callable[[torch.Tensor], object]) -> Any:
    """The object whose parts `recv` (which fills a buffer) takes, as split_message made them."""
    first = torch.empty(FIRST_MESSAGE_BYTES, dtype=torch.uint8)
    recv(first)
    size = int(first[:8].view(torch.int64)[0])
    payload = first[8:8 + min(size, FIRST_MESSAGE_BYTES - 8)].numpy().tobytes()
    if size > len(payload):
        rest = torch.empty(size - len(payload), dtype=torch.uint8)
        recv(rest)
        payload += rest.numpy().tobytes()
    return pickle.loads(payload)


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


def _counts(parts: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """(elements, offsets) of each part within their concatenation, as Alltoallv takes them."""
    counts = [part.numel() for part in parts]
    return counts, [sum(counts[:i]) for i in range(len(counts))]


class MpiCommunicator(Communicator):
    def __init__(self, mapping: Mapping, world: MPI.Comm | None = None) -> None:
        super().__init__(mapping)
        self.world = world or MPI.COMM_WORLD
        self.tp_comm = self.world.Split(color=mapping.pp_rank, key=mapping.tp_rank)
        self._sending: list[tuple[MPI.Request, torch.Tensor]] = []  # rank 0's last control message, going out

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

    def all_to_all(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> list[torch.Tensor]:
        out = torch.empty((sum(len(r) for r in recv), *recv[0].shape[1:]), dtype=recv[0].dtype)
        wait(self.tp_comm.Ialltoallv([_wire(torch.cat(send)), _counts(send)], [_wire(out), _counts(recv)]))
        for part, into in zip(out.split([len(r) for r in recv]), recv):
            into.copy_(part)
        return recv

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        wait(self.world.Isend(_wire(tensor.contiguous()), dest=dst, tag=_TENSOR_TAG))

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        wait(self.world.Irecv(_wire(tensor), source=src, tag=_TENSOR_TAG))
        return tensor

    def recv_async(self, tensor: torch.Tensor, src: int) -> Callable[[], object]:
        request = self.world.Irecv(_wire(tensor), source=src, tag=_TENSOR_TAG)
        return lambda: wait(request)

    def broadcast_object(self, obj: Any) -> Any:
        # One send to each rank rather than a broadcast, which may wait for every receiver
        # (large messages go by rendezvous): a busy rank must not hold back the others.
        if self.world.rank != 0:
            return receive_message(lambda buffer: wait(self.world.Irecv(buffer.numpy(), source=0, tag=_CONTROL_TAG)))
        self._finish_sending()
        parts = split_message(obj)
        self._sending = [(self.world.Isend(part.numpy(), dest=dst, tag=_CONTROL_TAG), part)
                         for dst in range(1, self.world.size) for part in parts]
        return obj

    def _finish_sending(self) -> None:
        """Wait until every rank has taken rank 0's last control message."""
        for request, _ in self._sending:
            wait(request)
        self._sending = []

    def gather_object(self, obj: Any) -> list[Any] | None:
        if self.world.rank != 0:
            wait(self.world.isend(obj, dest=0, tag=_GATHER_TAG))
            return None
        out = [obj]
        for src in range(1, self.world.size):
            out.append(wait(self.world.irecv(source=src, tag=_GATHER_TAG)))
        return out

    def close(self) -> None:
        self._finish_sending()
        self.tp_comm.Free()
