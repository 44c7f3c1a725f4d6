"""The CPU communicator for ranks that meet over TCP (the local spawner, later Slurm and Ray):
torch's gloo process groups on a store at the master address. It builds its own groups instead
of torch.distributed's global default, so several engines can live in one process."""

from __future__ import annotations

import datetime
import pickle
import socket
from typing import Any

import torch
import torch.distributed as dist

from dist_runtime.comm.base import Communicator, gather_last_dim, split_message, unpack_message
from dist_runtime.mapping import Mapping

_OBJECT_TAG = 1
# A rank that dies or hangs is found by the liveness watch within seconds; gloo's own limit only
# has to outlast the longest legitimate wait (an idle engine pings its ranks every minute).
OP_TIMEOUT = datetime.timedelta(days=1)


def local_address(master_addr: str) -> str:
    """This host's address on the route to the master: the hostname may resolve to an address
    the other ranks cannot reach (loopback, or the host's own in a network namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((master_addr, 9))  # picks a route; sends nothing
        return probe.getsockname()[0]


class GlooCommunicator(Communicator):
    def __init__(self, mapping: Mapping, master_addr: str, master_port: int, timeout_s: float = 300.0) -> None:
        super().__init__(mapping)
        self.store = dist.TCPStore(master_addr, master_port, mapping.world_size, is_master=mapping.rank == 0,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address(master_addr))]
        options._timeout = OP_TIMEOUT
        self.world = dist.ProcessGroupGloo(dist.PrefixStore("world", self.store), mapping.rank, mapping.world_size,
                                           options)
        self.tp_group = None
        if mapping.tp > 1:
            self.tp_group = dist.ProcessGroupGloo(dist.PrefixStore(f"tp{mapping.pp_rank}", self.store),
                                                  mapping.tp_rank, mapping.tp, options)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tp_group.allreduce([tensor]).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.mapping.tp)]
        self.tp_group.allgather([parts], [tensor.contiguous()]).wait()
        return gather_last_dim(parts)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.world.send([tensor.contiguous()], dst, 0).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.world.recv([tensor], src, 0).wait()
        return tensor

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.world.broadcast([tensor], options).wait()

    def broadcast_object(self, obj: Any) -> Any:
        first, rest = split_message(obj if self.mapping.rank == 0 else None, self.mapping.rank == 0)
        self._broadcast(first)
        size, payload = unpack_message(first)
        if size > len(payload):
            rest = rest if rest is not None else torch.empty(size - len(payload), dtype=torch.uint8)
            self._broadcast(rest)
            payload = payload + rest.numpy().tobytes()
        return obj if self.mapping.rank == 0 else pickle.loads(payload)

    def gather_object(self, obj: Any) -> list[Any] | None:
        if self.mapping.rank != 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            self.world.send([torch.tensor([len(data)])], 0, _OBJECT_TAG).wait()
            self.world.send([data], 0, _OBJECT_TAG).wait()
            return None
        out = [obj]
        for src in range(1, self.mapping.world_size):
            size = torch.empty(1, dtype=torch.int64)
            self.world.recv([size], src, _OBJECT_TAG).wait()
            data = torch.empty(int(size), dtype=torch.uint8)
            self.world.recv([data], src, _OBJECT_TAG).wait()
            out.append(pickle.loads(data.numpy().tobytes()))
        return out

    def close(self) -> None:
        self.tp_group = self.world = self.store = None
