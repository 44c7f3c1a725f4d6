"""The CPU communicator for ranks that meet over TCP (local spawner, and later Slurm and Ray):
torch.distributed with the gloo backend."""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from dist_runtime.comm.base import Communicator, gather_last_dim
from dist_runtime.mapping import Mapping


class GlooCommunicator(Communicator):
    def __init__(self, mapping: Mapping, master_addr: str, master_port: int, timeout_s: float = 300.0) -> None:
        super().__init__(mapping)
        dist.init_process_group("gloo", init_method=f"tcp://{master_addr}:{master_port}", rank=mapping.rank,
                                world_size=mapping.world_size, timeout=datetime.timedelta(seconds=timeout_s))
        # Every rank must create every group, in the same order.
        groups = [dist.new_group(m.tp_group()) for m in Mapping(mapping.tp, mapping.pp).all_ranks()[:: mapping.tp]]
        self.tp_group = groups[mapping.pp_rank]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.tp_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.mapping.tp)]
        dist.all_gather(parts, tensor.contiguous(), group=self.tp_group)
        return gather_last_dim(parts)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, src)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any] | None:
        out = [None] * self.mapping.world_size if self.mapping.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
