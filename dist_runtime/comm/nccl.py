"""The GPU communicator: NCCL through CuPy on torch's current stream, so its collectives can
be captured in CUDA graphs. Control messages (Steps, the NCCL ids themselves) go through the
CPU communicator it wraps (MPI or gloo).

Rank 0 is in the first stage, so no hidden states ever come to it: what it receives is the
sampled output of the last stage. That traffic (every send to rank 0, every receive on rank 0)
has a communicator of its own, `results`, and on rank 0 a stream of its own: a receive posted
there while the next micro-batch runs neither holds up rank 0's stream nor comes between the
hidden-state operations of `world`, which keep one order on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from cupy.cuda import nccl

from dist_runtime.comm.base import Communicator, gather_last_dim
from dist_runtime.mapping import Mapping

# NCCL's own enum values (ncclDataType_t), for CuPy builds that name fewer of them
_NCCL_TYPES = {torch.float32: 7, torch.float16: 6, torch.bfloat16: 9, torch.int64: 4, torch.int32: 2,
               torch.uint8: 1, torch.float64: 8}


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


class NcclCommunicator(Communicator):
    def __init__(self, mapping: Mapping, control: Communicator) -> None:
        super().__init__(mapping)
        self.control = control
        # Rank 0 makes one id for the world, one for results and one per TP group; everyone learns them all.
        ids = [nccl.get_unique_id() for _ in range(2 + mapping.pp)] if mapping.rank == 0 else None
        ids = control.broadcast_object(ids)
        self.world = nccl.NcclCommunicator(mapping.world_size, ids[0], mapping.rank)
        self.results = nccl.NcclCommunicator(mapping.world_size, ids[1], mapping.rank)
        self.tp_comm = nccl.NcclCommunicator(mapping.tp, ids[2 + mapping.pp_rank], mapping.tp_rank)
        self.results_stream = torch.cuda.Stream() if mapping.rank == 0 else None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tp_comm.allReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype],
                               nccl.NCCL_SUM, _stream())
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.mapping.tp, *tensor.shape))
        self.tp_comm.allGather(tensor.data_ptr(), out.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype],
                               _stream())
        return gather_last_dim(list(out.unbind(0)))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        comm = self.results if dst == 0 else self.world
        comm.send(tensor.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype], dst, _stream())

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        comm = self.results if self.mapping.rank == 0 else self.world
        comm.recv(tensor.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype], src, _stream())
        return tensor

    def recv_async(self, tensor: torch.Tensor, src: int) -> Callable[[], object]:
        """On rank 0 only (see the module). `tensor` may be in host memory: it then arrives
        through a device buffer, copied on the same stream."""
        stream = self.results_stream
        stream.wait_stream(torch.cuda.current_stream())  # the buffers may be memory that stream just freed
        with torch.cuda.stream(stream):
            buffer = tensor if tensor.is_cuda else torch.empty_like(tensor, device="cuda")
            self.results.recv(buffer.data_ptr(), buffer.numel(), _NCCL_TYPES[buffer.dtype], src, stream.cuda_stream)
            if buffer is not tensor:
                tensor.copy_(buffer, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return done.synchronize

    def broadcast_object(self, obj: Any) -> Any:
        return self.control.broadcast_object(obj)

    def gather_object(self, obj: Any) -> list[Any] | None:
        return self.control.gather_object(obj)

    def close(self) -> None:
        """Abort, not destroy: NCCL's destroy waits on the peers and was seen to hang at exit
        with two ranks; once the device is idle there is nothing left for it to wait for."""
        torch.cuda.synchronize()
        for comm in (self.world, self.results, self.tp_comm):
            if comm is not None:
                comm.abort()
        self.world = self.results = self.tp_comm = None
        self.control.close()
