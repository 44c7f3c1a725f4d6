"""The Communicator interface: data-plane collectives over a rank's TP group, point-to-point
tensors between PP stages, and the control plane (rank 0 -> everyone) for Steps."""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from typing import Any

import torch

from dist_runtime.mapping import Mapping


class Communicator(ABC):
    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group, in place; returns `tensor`."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate the TP group's tensors along the last dimension, in TP-rank order."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """To global rank `dst`."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Into `tensor`, from global rank `src`; returns `tensor`."""

    @abstractmethod
    def broadcast_object(self, obj: Any) -> Any:
        """Control plane: rank 0's `obj` (picklable) to every rank; others pass None."""

    @abstractmethod
    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (picklable), in rank order, on rank 0; None elsewhere."""

    def close(self) -> None:  # noqa: B027 - optional hook: most transports have nothing to release
        """Release the transport."""


def gather_last_dim(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=-1)


# A control message travels as one fixed-size broadcast holding its length and, when it fits
# (as a decode step for hundreds of sequences does), the whole pickle; a larger one needs a
# second broadcast for the rest. Receivers learn the size from the first.
FIRST_MESSAGE_BYTES = 1 << 16


def split_message(obj: Any, is_root: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The root's (first buffer, remainder or None); other ranks get an empty first buffer."""
    first = torch.zeros(FIRST_MESSAGE_BYTES, dtype=torch.uint8)
    if not is_root:
        return first, None
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    room = FIRST_MESSAGE_BYTES - 8
    first[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
    head = payload[:room]
    first[8:8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
    rest = torch.frombuffer(bytearray(payload[room:]), dtype=torch.uint8) if len(payload) > room else None
    return first, rest


def unpack_message(first: torch.Tensor) -> tuple[int, bytes]:
    """(total size, the part of the payload the first buffer holds)."""
    size = int(first[:8].view(torch.int64)[0])
    return size, first[8:8 + min(size, FIRST_MESSAGE_BYTES - 8)].numpy().tobytes()
