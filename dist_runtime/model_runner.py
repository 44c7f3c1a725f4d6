"""A rank's ModelRunner: its stage of the model, its weights, its KV cache; runs Steps."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
from torch import nn

from dist_runtime.comm.base import Communicator
from dist_runtime.engine import Engine
from dist_runtime.errors import EngineError
from dist_runtime.layers.attention import AttentionMetadata
from dist_runtime.mapping import Mapping
from dist_runtime.models import build_model
from dist_runtime.sampler import sample
from dist_runtime.step import Step


@dataclass
class StepOutput:
    """What rank 0 gets back from a step, one row per sampling sequence (step.sample_rows)."""

    token_ids: list[int]
    logprobs: torch.Tensor | None = None  # [rows, 1 + 2N], see sampler.Sampled
    logits: torch.Tensor | None = None  # [rows, vocab], when the step asked for them


class ModelRunner:
    def __init__(self, engine: Engine, mapping: Mapping, comm: Communicator, device: str = "cpu",
                 verify: bool = True) -> None:
        self.engine, self.mapping, self.comm = engine, mapping, comm
        self.device = torch.device(device)
        plan = engine.plan
        self.model = build_model(engine.config, mapping, plan.layer_range(mapping.pp_rank), engine.dtype,
                                 device="meta", comm=comm)
        _load_weights(self.model, engine.load_rank_weights(mapping.rank, self.device, verify),
                      engine.rank_path(mapping.rank))
        self.model.to(self.device)  # the buffers (rotary frequencies) follow the weights
        self.block_size = plan.block_size
        self.num_blocks = plan.num_kv_blocks
        for attn in self.model.attention_layers():
            shape = (self.num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=engine.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=engine.dtype, device=self.device)
        self.hidden_size = engine.config.hidden_size

    @torch.inference_mode()
    def run(self, step: Step) -> StepOutput | None:
        """Run this rank's part of `step`. Rank 0 gets the StepOutput; other ranks get None."""
        m = self.mapping
        positions = torch.from_numpy(step.positions).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(step.slot_mapping).to(self.device),
            query_start=step.query_start.tolist(),
            context_lens=step.context_lens.tolist(),
            block_tables=torch.from_numpy(step.block_tables).to(self.device, torch.int64),
        )
        if m.is_first_stage:
            inputs = torch.from_numpy(step.token_ids).to(self.device)
        else:
            inputs = torch.empty(step.num_tokens, self.hidden_size, dtype=self.engine.dtype, device=self.device)
            self.comm.recv(inputs, m.prev_stage_rank())
        hidden = self.model(inputs, positions, meta)
        if not m.is_last_stage:
            self.comm.send(hidden, m.next_stage_rank())
            return self._receive_output(step) if m.rank == 0 else None
        last_tokens = torch.from_numpy(step.query_start[step.sample_rows + 1] - 1).to(self.device)
        logits = self.model.compute_logits(hidden[last_tokens])
        if m.rank != m.sampler_rank() or not len(step.sample_rows):
            return StepOutput([]) if m.rank == 0 else None
        sampled = sample(logits, step)
        out = StepOutput(sampled.token_ids.tolist(), sampled.logprobs, logits if step.return_logits else None)
        if m.rank == 0:
            return out
        self.comm.send(sampled.token_ids, 0)
        for extra in (sampled.logprobs, out.logits):
            if extra is not None:
                self.comm.send(extra, 0)
        return None

    def _receive_output(self, step: Step) -> StepOutput:
        """Rank 0, when another rank samples: the same tensors, in the order they are sent."""
        rows, src = len(step.sample_rows), self.mapping.sampler_rank()
        if rows == 0:
            return StepOutput([])
        ids = self.comm.recv(torch.empty(rows, dtype=torch.int64, device=self.device), src)
        logprobs = logits = None
        if len(step.num_logprobs) and step.num_logprobs.max() >= 0:
            width = 1 + 2 * int(step.num_logprobs.max())
            logprobs = self.comm.recv(torch.empty(rows, width, device=self.device), src)
        if step.return_logits:
            logits = self.comm.recv(torch.empty(rows, self.engine.config.vocab_size, device=self.device), src)
        return StepOutput(ids.tolist(), logprobs, logits)

    def stats(self) -> dict:
        """This rank's memory figures: peak resident memory, and peak GPU memory on a GPU."""
        stats = {"rank": self.mapping.rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device.type == "cuda":
            stats["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return stats


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], file) -> None:
    """Put the rank file's tensors in place of the meta parameters; a tied parameter is
    replaced everywhere it is used."""
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise EngineError(f"{file}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    users: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            users.setdefault(id(param), []).append((module, attr))
    for name, param in params.items():
        tensor = weights[name]
        if tensor.shape != param.shape:
            raise EngineError(f"{file}: {name} has shape {list(tensor.shape)}, the plan says {list(param.shape)}")
        new = nn.Parameter(tensor, requires_grad=False)
        for module, attr in users[id(param)]:
            setattr(module, attr, new)

