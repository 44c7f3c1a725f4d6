"""The CPU communicator for ranks that meet over TCP (the local spawner, Slurm, Ray): torch's
gloo process groups on a store at the master address for tensors, socket Channels for control
messages and for a TP group's small collectives. It builds its own groups instead of
torch.distributed's global default, so several engines can live in one process. The store and
the Channels admit only ranks that prove the job's secret; they listen on the address the other
ranks dial (loopback when the master address is)."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dist_runtime.comm.address import local_address
from dist_runtime.comm.base import Communicator, gather_last_dim
from dist_runtime.comm.channel import Channel
from dist_runtime.comm.store import RendezvousStore
from dist_runtime.mapping import Mapping

# A rank that dies or hangs is found by the liveness watch within seconds; gloo's own limit only
# has to outlast the longest legitimate wait (an idle engine pings its ranks every minute).
OP_TIMEOUT = datetime.timedelta(days=1)
# Up to this size a TP group's collectives go over its Channel: 0.2-0.3 ms for 1 KB to 256 KB on
# 2 cores, where gloo's take 2 ms whatever the size; from 4 MB on, gloo's ring is faster (5 ms
# against 17 ms).
CHANNEL_LIMIT_BYTES = 1 << 20


class GlooCommunicator(Communicator):
    def __init__(self, mapping: Mapping, master_addr: str, master_port: int, secret: str,
                 timeout_s: float = 300.0) -> None:
        super().__init__(mapping)
        self.store = RendezvousStore(master_addr, master_port, secret, serve=mapping.rank == 0,
                                     timeout=datetime.timedelta(seconds=timeout_s))
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address(master_addr))]
        options._timeout = OP_TIMEOUT
        self.world = dist.ProcessGroupGloo(dist.PrefixStore("world", self.store), mapping.rank, mapping.world_size,
                                           options)
        host = local_address(master_addr)
        # Steps and replies go over plain sockets: gloo's broadcast cost milliseconds a step
        self.control = Channel(mapping.rank, mapping.world_size, self.store, host, secret)
        self.tp_group = self.tp_channel = None
        if mapping.tp > 1:
            self.tp_group = dist.ProcessGroupGloo(dist.PrefixStore(f"tp{mapping.pp_rank}", self.store),
                                                  mapping.tp_rank, mapping.tp, options)
            self.tp_channel = Channel(mapping.tp_rank, mapping.tp,
                                      dist.PrefixStore(f"tp-channel{mapping.pp_rank}", self.store), host, secret)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if _small(tensor):
            return self.tp_channel.all_reduce(tensor)
        self.tp_group.allreduce([tensor]).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        if _small(tensor):
            return gather_last_dim(self.tp_channel.all_gather(tensor))
        parts = [torch.empty_like(tensor) for _ in range(self.mapping.tp)]
        self.tp_group.allgather([parts], [tensor]).wait()
        return gather_last_dim(parts)

    def all_to_all(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [len(r) for r in recv]
        out = torch.empty((sum(sizes), *recv[0].shape[1:]), dtype=recv[0].dtype)
        self.tp_group.alltoall_base(out, torch.cat(send), sizes, [len(s) for s in send],
                                    dist.AllToAllOptions()).wait()
        for part, into in zip(out.split(sizes), recv):
            into.copy_(part)
        return recv

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.world.send([tensor.contiguous()], dst, 0).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.world.recv([tensor], src, 0).wait()
        return tensor

    def recv_async(self, tensor: torch.Tensor, src: int) -> Callable[[], object]:
        return self.world.recv([tensor], src, 0).wait

    def broadcast_object(self, obj: Any) -> Any:
        return self.control.broadcast_object(obj)

    def gather_object(self, obj: Any) -> list[Any] | None:
        return self.control.gather_object(obj)

    def close(self) -> None:
        for channel in (self.control, self.tp_channel):
            if channel is not None:
                channel.close()
        if self.store is not None:
            self.store.close()
        self.tp_group = self.tp_channel = self.world = self.store = None


def _small(tensor: torch.Tensor) -> bool:
    return tensor.numel() * tensor.element_size() <= CHANNEL_LIMIT_BYTES
