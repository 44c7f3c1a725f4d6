"""The communicator of a world of one rank: nothing to exchange."""

from collections.abc import Callable
from typing import Any

import torch

from dist_runtime.comm.base import Communicator


class SoloCommunicator(Communicator):
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_to_all(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> list[torch.Tensor]:
        recv[0].copy_(send[0])
        return recv

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        raise RuntimeError("a world of one rank has no one to send to")

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        raise RuntimeError("a world of one rank has no one to receive from")

    def recv_async(self, tensor: torch.Tensor, src: int) -> Callable[[], object]:
        raise RuntimeError("a world of one rank has no one to receive from")

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def gather_object(self, obj: Any) -> list[Any]:
        return [obj]
