"""The CPU communicator for ranks that meet over TCP (the local spawner, later Slurm and Ray):
torch's gloo process groups on a store at the master address. It builds its own groups instead
of torch.distributed's global default, so several engines can live in one process."""

from __future__ import annotations

import datetime
import pickle
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dist_runtime.comm.base import Communicator, gather_last_dim, receive_message, split_message
from dist_runtime.mapping import Mapping

_OBJECT_TAG = 1
_CONTROL_TAG = 2
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
        self._sending: list[tuple[dist.Work, torch.Tensor]] = []  # rank 0's last control message, going out
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

    def recv_async(self, tensor: torch.Tensor, src: int) -> Callable[[], object]:
        return self.world.recv([tensor], src, 0).wait

    def broadcast_object(self, obj: Any) -> Any:
        # One send to each rank rather than a broadcast: gloo's broadcast is a tree whose sends
        # each wait for the receiver, so a busy rank would hold back the ranks behind it.
        if self.mapping.rank != 0:
            return receive_message(lambda buffer: self.world.recv([buffer], 0, _CONTROL_TAG).wait())
        self._finish_sending()
        parts = split_message(obj)
        self._sending = [(self.world.send([part], dst, _CONTROL_TAG), part)
                         for dst in range(1, self.mapping.world_size) for part in parts]
        return obj

    def _finish_sending(self) -> None:
        """Wait until every rank has taken rank 0's last control message."""
        for work, _ in self._sending:
            work.wait()
        self._sending = []

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
        self._finish_sending()
        self.tp_group = self.world = self.store = None
