"""The GPU communicator: NCCL through CuPy on torch's current stream, so its collectives can
be captured in CUDA graphs. Control messages (Steps, the NCCL ids themselves) go through the
CPU communicator it wraps (MPI or gloo)."""

from __future__ import annotations

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
        # Rank 0 makes one id for the world and one per TP group; everyone learns them all.
        ids = [nccl.get_unique_id() for _ in range(1 + mapping.pp)] if mapping.rank == 0 else None
        ids = control.broadcast_object(ids)
        self.world = nccl.NcclCommunicator(mapping.world_size, ids[0], mapping.rank)
        self.tp_comm = nccl.NcclCommunicator(mapping.tp, ids[1 + mapping.pp_rank], mapping.tp_rank)

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
        self.world.send(tensor.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype], dst, _stream())

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.world.recv(tensor.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype], src, _stream())
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        return self.control.broadcast_object(obj)

    def gather_object(self, obj: Any) -> list[Any] | None:
        return self.control.gather_object(obj)

    def close(self) -> None:
        """Abort, not destroy: NCCL's destroy waits on the peers and was seen to hang at exit
        with two ranks; once the device is idle there is nothing left for it to wait for."""
        torch.cuda.synchronize()
        for comm in (self.world, self.tp_comm):
            if comm is not None:
                comm.abort()
        self.world = self.tp_comm = None
        self.control.close()
