"""The GPU communicator: NCCL through CuPy on torch's current stream, so its collectives can
be captured in CUDA graphs. Control messages (Steps, the NCCL ids themselves) go through the
CPU communicator it wraps (MPI or gloo).

Rank 0's receive of the last stage's output is posted on rank 0's own stream, in Step order,
like every other point-to-point operation: so with micro-batches the host does not wait, but
the device runs the next micro-batch's first stage only once the last one's output is in. A
receive on a stream and communicator of its own would let the stages overlap on the device;
it has not run on several GPUs yet, so it is not here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from cupy.cuda import nccl

from dist_runtime.comm.base import Communicator, gather_last_dim
from dist_runtime.comm.one_shot import OneShotAllReduce
from dist_runtime.cuda_graphs import replay_ms
from dist_runtime.mapping import Mapping

log = logging.getLogger(__name__)

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
        log.info("NCCL communicators up")
        self.one_shot, self.one_shot_limit = None, 0
        self.tuning: dict[str, Any] = {}
        if mapping.tp > 1 and os.environ.get("DIST_RUNTIME_ONE_SHOT", "1") != "0":
            self._tune_one_shot()

    def _tune_one_shot(self) -> None:
        """Time NCCL and the one-shot kernel at each message size, both inside CUDA graphs as
        decode runs them; up to the largest size where one-shot wins, it takes the all-reduces.
        Rank 0's timings decide for everyone: a split decision would deadlock."""
        one_shot = OneShotAllReduce(self.control)
        if one_shot.error is None:
            check = torch.full((1024,), self.mapping.tp_rank + 1.0, device="cuda")
            one_shot(check)
            sums_wrong = bool((check != self.mapping.tp * (self.mapping.tp + 1) / 2).any())
            sums_wrong_by_rank = self.control.broadcast_object(self.control.gather_object(sums_wrong))
            one_shot.error = "its sums were wrong" if any(sums_wrong_by_rank) else None
        if one_shot.error is not None:
            one_shot.close()
            self.tuning = {"one_shot": f"off: {one_shot.error}"}
            return
        times = {}
        for size in (1 << k for k in range(12, 21)):
            x = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")
            times[size] = (_graph_us(self._nccl_all_reduce, x), _graph_us(one_shot, x))
        limit = max((s for s, (nccl_us, one_us) in times.items() if one_us < nccl_us), default=0)
        self.one_shot_limit = self.control.broadcast_object(limit)
        self.one_shot = one_shot
        by_size = {size: {"nccl": round(n, 1), "one_shot": round(o, 1)} for size, (n, o) in times.items()}
        self.tuning = {"one_shot_limit_bytes": self.one_shot_limit, "us_by_bytes": by_size}
        log.info("one-shot all-reduce up to %d bytes", self.one_shot_limit)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() * tensor.element_size() <= self.one_shot_limit and self.one_shot.fits(tensor):
            return self.one_shot(tensor)
        return self._nccl_all_reduce(tensor)

    def all_reduce_add_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        if (partial.numel() * partial.element_size() <= self.one_shot_limit
                and self.one_shot.fits_norm(partial, residual, weight)):
            return self.one_shot.add_rmsnorm(partial, residual, weight, eps)
        return None

    def _nccl_all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tp_comm.allReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype],
                               nccl.NCCL_SUM, _stream())
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = tensor.new_empty((self.mapping.tp, *tensor.shape))
        self.tp_comm.allGather(tensor.data_ptr(), out.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype],
                               _stream())
        return gather_last_dim(list(out.unbind(0)))

    def all_to_all(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> list[torch.Tensor]:
        """One NCCL group of a send and a receive per peer (NCCL has no all-to-all of its own)."""
        me = self.mapping.tp_rank
        recv[me].copy_(send[me])
        nccl.groupStart()
        for peer in range(self.mapping.tp):
            if peer == me:
                continue
            out, into = send[peer].contiguous(), recv[peer]
            if out.numel():
                self.tp_comm.send(out.data_ptr(), out.numel(), _NCCL_TYPES[out.dtype], peer, _stream())
            if into.numel():
                self.tp_comm.recv(into.data_ptr(), into.numel(), _NCCL_TYPES[into.dtype], peer, _stream())
        nccl.groupEnd()
        return recv

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        self.world.send(tensor.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype], dst, _stream())

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.world.recv(tensor.data_ptr(), tensor.numel(), _NCCL_TYPES[tensor.dtype], src, _stream())
        return tensor

    def recv_async(self, tensor: torch.Tensor, src: int) -> Callable[[], object]:
        """Posted on the current stream (see the module). `tensor` may be in host memory: it
        then arrives through a device buffer, copied on the same stream."""
        buffer = tensor if tensor.is_cuda else torch.empty_like(tensor, device="cuda")
        self.recv(buffer, src)
        if buffer is not tensor:
            tensor.copy_(buffer, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return done.synchronize

    def broadcast_object(self, obj: Any) -> Any:
        return self.control.broadcast_object(obj)

    def gather_object(self, obj: Any) -> list[Any] | None:
        return self.control.gather_object(obj)

    def close(self) -> None:
        """Abort, not destroy: NCCL's destroy waits on the peers and can hang at exit
        with two ranks; once the device is idle there is nothing left for it to wait for."""
        torch.cuda.synchronize()
        if self.one_shot is not None:
            self.one_shot.close()
        for comm in (self.world, self.tp_comm):
            if comm is not None:
                comm.abort()
        self.world = self.tp_comm = None
        self.control.close()


def _graph_us(all_reduce, x: torch.Tensor, ops: int = 20, replays: int = 5) -> float:
    """Microseconds per all-reduce of `x`, replayed from a CUDA graph of `ops` of them."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(ops):
            all_reduce(x)
    return replay_ms(graph, replays) * 1e3 / ops
