"""A sparse mixture-of-experts block (Mixtral, Qwen3-MoE): a router scores every expert for each
token, the top-k by softmax probability are chosen, and the token's output is their SiLU-gated
MLPs' outputs weighted by those probabilities (renormalised over the chosen ones where the
model says so).

Expert parallelism (Mapping.ep): a rank holds the whole experts of its group, each split over
the group's moe_tp ranks as a dense MLP is over TP ranks (gate and up by rows, down by
columns). Tokens reach the block replicated on every TP rank (attention's all-reduce leaves them
so), so every rank routes every token alike and computes only the (token, expert) pairs of its
own experts. The TP group's contributions then meet one of two ways, the plan's
`expert_exchange`:
- "all-reduce": each rank's share is a [tokens, hidden] partial sum (zero rows for tokens that
  chose none of its experts), summed by the all-reduce the dense layers use (on GPUs joined with
  the next RMSNorm);
- "all-to-all": each token has an owner (tokens split evenly over the TP group), every rank sends
  only the rows it computed to their owners, which add them up, and an all-gather gives every
  rank every token's output.
All-reduce is the plan's default: it runs inside CUDA graphs (the all-to-all's sizes are the
step's routing, read on the host), and on 4 CPU ranks under MPI (Qwen3-30B-A3B's and
Mixtral-8x7B's hidden size and routing, experts made small so that the exchange dominates) it
was as fast or faster: 3.6 ms against 5.2 at batch 1, 35 against 39 at 256 (Qwen3), 22
against 30 at 256 (Mixtral); benchmarks/moe_exchange.py measures it on any ranks.

The torch code here is the CPU path and the reference of the GPU kernels (kernels/fused_moe.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from dist_runtime.errors import PlanError
from dist_runtime.layers import declare, split, unsliced
from dist_runtime.layers.quantized import quantized_linear
from dist_runtime.mapping import Mapping

EXCHANGES = ("all-reduce", "all-to-all")


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """How a checkpoint names expert e's tensors, below the experts' module: `{e}.{gate}.weight`."""

    gate: str
    up: str
    down: str


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [tokens, top_k], expert ids int64 [tokens, top_k]): the softmax over all
    experts in float32, its top k, renormalised to sum to 1 if asked."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight) if scale is None else quantized_linear(x, weight, scale, None)


def experts_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, first_expert: int, gate_up_scale: torch.Tensor | None = None,
                      down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """sum over each token's chosen experts held here (global ids first_expert ..
    first_expert + len(gate_up) - 1) of weight * down(silu(gate(x)) * up(x)), [tokens, hidden]
    in x's dtype; `gate_up` [experts, 2 * inter, hidden] ([gate | up] rows), `down`
    [experts, hidden, inter], quantized with one scale per expert and output row where scales
    are given. Expert by expert, as transformers computes it."""
    out = torch.zeros_like(x)
    local = ids - first_expert
    for e in range(len(gate_up)):
        token, slot = torch.where(local == e)
        if not len(token):
            continue
        h = expert_linear(x[token], gate_up[e], None if gate_up_scale is None else gate_up_scale[e])
        gate, up = h.chunk(2, dim=-1)
        y = expert_linear(F.silu(gate) * up, down[e], None if down_scale is None else down_scale[e])
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


class Router(nn.Module):
    """The experts' scores per token (transformers calls it `gate`); replicated, never quantized,
    so every rank routes alike and as the checkpoint does."""

    def __init__(self, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.weight = declare(nn.Parameter(torch.empty(num_experts, hidden)), "replicated", unsliced)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """This rank's experts as two stacked tensors: `gate_up_proj` [experts, 2 * inter / moe_tp,
    hidden] (each expert's gate rows, then its up rows) and `down_proj` [experts, hidden,
    inter / moe_tp]. Each is cut from the checkpoint's per-expert tensors (`names`)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, m: Mapping, names: ExpertNames) -> None:
        super().__init__()
        if num_experts % m.ep:
            raise PlanError(f"{num_experts} experts do not divide by ep={m.ep}")
        if inter % m.moe_tp:
            raise PlanError(f"expert intermediate size {inter} does not divide by tp / ep = {m.moe_tp} "
                            f"(tp={m.tp}, ep={m.ep})")
        self.num_experts, self.ids, self.names = num_experts, m.experts(num_experts), names
        self.hidden, self.inter = hidden, inter
        parts, part = m.moe_tp, m.moe_tp_rank

        def shard_gate_up(tensors: list[torch.Tensor]) -> torch.Tensor:
            pairs = zip(tensors[0::2], tensors[1::2])
            return torch.stack([torch.cat([split(g, 0, parts, part), split(u, 0, parts, part)]) for g, u in pairs])

        def shard_down(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([split(d, 1, parts, part) for d in tensors])

        local = len(self.ids)
        self.gate_up_proj = declare(nn.Parameter(torch.empty(local, 2 * inter // parts, hidden)), "expert-column",
                                    shard_gate_up, linear=True)
        self.down_proj = declare(nn.Parameter(torch.empty(local, hidden, inter // parts)), "expert-row",
                                 shard_down, linear=True)
        self.gate_up_proj_scale = self.down_proj_scale = None  # [experts, rows] when quantized, set at load

    def checkpoint_sources(self, param: str) -> list[tuple[str, tuple[int, ...]]]:
        """(name below this module, full shape) of the checkpoint tensors `param` is cut from, in
        the order its slicing takes them: per expert, gate then up, or down."""
        n = self.names
        if param == "gate_up_proj":
            shape = (self.inter, self.hidden)
            return [(f"{e}.{piece}.weight", shape) for e in self.ids for piece in (n.gate, n.up)]
        return [(f"{e}.{n.down}.weight", (self.hidden, self.inter)) for e in self.ids]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of every token's output, [tokens, hidden]."""
        if x.is_cuda:
            from dist_runtime.kernels.fused_moe import fused_experts

            return fused_experts(x, self.gate_up_proj, self.down_proj, weights, ids, self.ids.start,
                                 self.gate_up_proj_scale, self.down_proj_scale)
        return experts_reference(x, self.gate_up_proj, self.down_proj, weights, ids, self.ids.start,
                                 self.gate_up_proj_scale, self.down_proj_scale)


class SparseMoeBlock(nn.Module):
    """`gate` (the router) and `experts`, named as transformers names them. Its `partial` and
    `finish` split like a row-parallel layer's, so that a decoder layer finishes it as it does
    a dense MLP's down_proj (joined with the next RMSNorm where the communicator can)."""

    def __init__(self, num_experts: int, top_k: int, renormalize: bool, hidden: int, inter: int, m: Mapping,
                 comm, names: ExpertNames) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.mapping, self.comm = top_k, renormalize, m, comm
        self.gate = Router(num_experts, hidden)
        self.experts = Experts(num_experts, hidden, inter, m, names)
        self.exchange = "all-reduce"  # the plan's expert_exchange, set by the runner

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output, before finish()'s all-reduce; with the all-to-all
        exchange, the whole output, which finish() leaves as it is."""
        logits = self.gate(x)
        if x.is_cuda:
            from dist_runtime.kernels.fused_moe import topk_softmax

            weights, ids = topk_softmax(logits, self.top_k, self.renormalize)
        else:
            weights, ids = route(logits, self.top_k, self.renormalize)
        if self.exchange == "all-to-all" and self.mapping.tp > 1:
            return self._all_to_all(x, weights, ids)
        return self.experts(x, weights, ids)

    @property
    def input_layer(self) -> None:
        """No GEMM takes the input as a norm hands it over (the router reads it unquantized)."""
        return None

    @property
    def output_layer(self) -> SparseMoeBlock:
        """The layer whose all-reduce the partial output still needs: this block itself."""
        return self

    def finish(self, partial_sum: torch.Tensor) -> torch.Tensor:
        if self.mapping.tp == 1 or self.exchange == "all-to-all":
            return partial_sum
        return self.comm.all_reduce(partial_sum)

    def finish_add_rmsnorm(self, partial_sum: torch.Tensor, residual: torch.Tensor,
                           norm) -> tuple[torch.Tensor, torch.Tensor] | None:
        """As RowParallelLinear.finish_add_rmsnorm: one kernel where the communicator has one."""
        if self.mapping.tp == 1 or self.exchange == "all-to-all":
            return None
        return self.comm.all_reduce_add_rmsnorm(partial_sum, residual, norm.weight, norm.eps)

    def _all_to_all(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The rows this rank computed go to their tokens' owners, which sum them; then an
        all-gather. Routing is the same on every rank, so each knows what the others send."""
        m, tokens = self.mapping, len(x)
        group_of = m.expert_group(ids, self.experts.num_experts)  # each chosen expert's group
        chunk = -(-tokens // m.tp)
        computed = torch.nonzero((group_of == m.ep_rank).any(-1)).flatten()  # ascending token ids
        rows = self.experts(x[computed], weights[computed], ids[computed])
        owner_starts = torch.arange(m.tp + 1, device=x.device) * chunk
        ends = torch.searchsorted(computed, owner_starts).tolist()
        send = [rows[ends[r]:ends[r + 1]] for r in range(m.tp)]
        mine = slice(m.tp_rank * chunk, min(tokens, (m.tp_rank + 1) * chunk))
        from_rank = [torch.nonzero((group_of[mine] == m.ep_rank_of(r)).any(-1)).flatten() for r in range(m.tp)]
        recv = [rows.new_empty(len(t), x.shape[-1]) for t in from_rank]
        self.comm.all_to_all(send, recv)
        owned = x.new_zeros(chunk, x.shape[-1])
        for t, part in zip(from_rank, recv):
            owned.index_add_(0, t, part)
        return self.comm.all_gather(owned).view(chunk, m.tp, -1).transpose(0, 1).reshape(m.tp * chunk, -1)[:tokens]


def set_expert_exchange(model: nn.Module, exchange: str) -> None:
    """Every MoE block of `model` takes `exchange` (the plan's expert_exchange)."""
    if exchange not in EXCHANGES:
        raise PlanError(f"expert exchange {exchange!r} is not one of {', '.join(EXCHANGES)}")
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.exchange = exchange
