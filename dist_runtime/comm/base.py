"""The Communicator interface: data-plane collectives over a rank's TP group, point-to-point
tensors between PP stages, and the control plane (rank 0 -> everyone) for Steps."""

from __future__ import annotations

import pickle
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
