"""The Communicator interface: data-plane collectives over a rank's TP group, point-to-point
tensors between PP stages, and the control plane (rank 0 -> everyone) for Steps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from dist_runtime.mapping import Mapping


class Communicator(ABC):
    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group, in place; returns `tensor`."""

    def all_reduce_add_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """all_reduce(partial), then RMSNorm of that plus `residual` (updated in place to the sum),
        in one kernel where the transport has one: (the norm's output, residual). None where it has
        none, and the caller does the two apart."""
        return None

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate the TP group's tensors along the last dimension, in TP-rank order."""

    @abstractmethod
    def all_to_all(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> list[torch.Tensor]:
        """Within the TP group: send[i] goes to TP rank i, and recv[i] is filled from TP rank i;
        returns `recv`. The tensors share one dtype and trailing shape; their row counts may
        differ (each pair of ranks knows beforehand what the other sends), zero included."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """To global rank `dst`."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Into `tensor`, from global rank `src`; returns `tensor`."""

    @abstractmethod
    def recv_async(self, tensor: torch.Tensor, src: int) -> Callable[[], object]:
        """Start receiving into `tensor` from global rank `src` and return at once; call the
        returned function to wait until `tensor` holds the message. Messages from one rank
        arrive in the order sent, whether received with `recv` or this."""

    @abstractmethod
    def broadcast_object(self, obj: Any) -> Any:
        """Control plane: rank 0's `obj` (picklable) to every rank; others pass None. Rank 0
        does not wait for the others to take it (a rank still busy with an earlier step must
        hold back neither rank 0 nor the rest), but it is theirs before rank 0's next message."""

    @abstractmethod
    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (picklable), in rank order, on rank 0; None elsewhere."""

    def close(self) -> None:  # noqa: B027 - optional hook: most transports have nothing to release
        """Release the transport."""


def gather_last_dim(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=-1)
