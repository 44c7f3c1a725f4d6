"""A rank's ModelRunner: its stage of the model, its weights, its KV cache; runs Steps."""

from __future__ import annotations

import gc
import logging
import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dist_runtime.comm.base import Communicator
from dist_runtime.cuda_graphs import DecodeGraphs, buckets
from dist_runtime.engine import Engine
from dist_runtime.errors import EngineError
from dist_runtime.int4 import NIBBLES
from dist_runtime.layers.attention import AttentionMetadata
from dist_runtime.layers.linear import kv_head_range
from dist_runtime.layers.moe import set_expert_exchange
from dist_runtime.layers.quantized import check_device
from dist_runtime.mapping import Mapping
from dist_runtime.models import build_model
from dist_runtime.quantization import FP8, SCALE_SUFFIX, ZERO_SUFFIX, g_idx_name, input_scale_name
from dist_runtime.sampler import Sampled, sample
from dist_runtime.step import Step, to_device
from dist_runtime.tuning import KernelChoices, install

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What rank 0 gets back from a step, one row per sampling sequence (step.sample_rows)."""

    token_ids: list[int]
    logprobs: torch.Tensor | None = None  # [rows, 1 + 2N], see sampler.Sampled
    logits: torch.Tensor | None = None  # [len(step.return_logits), vocab]: the rows that asked for them


@dataclass
class Launched:
    """Rank 0's share of a step whose work is queued on the device: `collect` waits for it."""

    token_ids: torch.Tensor  # int64 [rows] on the host (pinned on a GPU), valid once every wait has returned
    waits: list[Callable[[], object]]  # none on the CPU when rank 0 sampled: the work is done at launch
    logprobs: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ModelRunner:
    """`device` "cpu" (the reference) or a CUDA device. On a GPU the KV cache takes
    `kv_cache_fraction` of the memory left free after a profiling forward, and decode steps
    replay CUDA graphs (unless `cuda_graphs` is off)."""

    def __init__(self, engine: Engine, mapping: Mapping, comm: Communicator, device: str, verify: bool,
                 kv_cache_fraction: float, cuda_graphs: bool = True) -> None:
        self.engine, self.mapping, self.comm = engine, mapping, comm
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        plan = engine.plan
        self.model = build_model(engine.config, mapping, plan.layer_range(mapping.pp_rank), engine.dtype,
                                 device="meta", comm=comm)
        _load_weights(self.model, engine.load_rank_weights(mapping.rank, self.device, verify),
                      engine.rank_path(mapping.rank))
        self.model.to(self.device)  # the buffers (rotary frequencies) follow the weights
        set_expert_exchange(self.model, plan.expert_exchange)
        if plan.kv_cache_dtype == "fp8":
            check_device(plan.kv_dtype, self.device, kv_cache=True)
            self._set_kv_scales()
        # The kernel choices tuned at build for this engine's shapes; none on the CPU (the reference).
        self.kernels = KernelChoices.from_record(engine.tuning) if self.device.type == "cuda" else None
        install(self.model, self.kernels)
        self.hidden_size = engine.config.hidden_size
        self.block_size = plan.block_size
        # DIST_RUNTIME_CUDA_GRAPHS=0 runs decode eagerly on every rank: a way to tell a graph's fault from the model's
        self.kv_cache_fraction = kv_cache_fraction
        self.use_cuda_graphs = cuda_graphs and os.environ.get("DIST_RUNTIME_CUDA_GRAPHS", "1") != "0"
        log.info("weights loaded")
        self.num_blocks = plan.num_kv_blocks if self.device.type == "cpu" else self._blocks_that_fit()
        self.graphs = None
        self.last_sampled: torch.Tensor | None = None  # the latest step's sampled ids, on the device (Step.prev_rows)
        self.busy_s = 0.0  # time spent on forwards and sampling: the rest of the wall time, this rank idled
        self._spans: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()  # GPU: not in busy_s yet

    def _set_kv_scales(self) -> None:
        """This rank's KV heads' entries of engine.json's scales (per layer, per KV head)."""
        scales, m = self.engine.build.kv_scales, self.mapping
        heads = list(kv_head_range(self.engine.config.num_kv_heads, m.tp, m.tp_rank))
        for layer, attn in zip(self.engine.plan.layer_range(m.pp_rank), self.model.attention_layers()):
            attn.k_scale, attn.v_scale = (torch.tensor(scales[kv][layer], device=self.device)[heads] for kv in "kv")

    def _block_bytes(self) -> int:
        return sum(2 * self.block_size * a.num_kv_heads * a.head_dim * self.engine.plan.kv_dtype.itemsize
                   for a in self.model.attention_layers())

    def _blocks_that_fit(self) -> int:
        """Blocks in `kv_cache_fraction` of the memory free after a forward of the largest step."""
        plan = self.engine.plan
        tokens = plan.max_num_tokens
        self._allocate_kv(-(-tokens // self.block_size))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            meta = AttentionMetadata(torch.arange(tokens, device=self.device), [0, tokens], [tokens],
                                     torch.arange(-(-tokens // self.block_size), device=self.device)[None],
                                     torch.tensor([tokens], device=self.device))  # int64, as a step's
            inputs = (torch.zeros(tokens, dtype=torch.int64, device=self.device) if self.mapping.is_first_stage
                      else torch.zeros(tokens, self.hidden_size, dtype=self.engine.dtype, device=self.device))
            hidden = self.model(inputs, torch.arange(tokens, device=self.device), meta)
            if self.mapping.is_last_stage:
                self.model.compute_logits(hidden[-plan.max_batch_size:]).float()  # as sampling takes them
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - base
        self._allocate_kv(0)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        return max(1, int(self.kv_cache_fraction * (free - activations)) // self._block_bytes())

    def _allocate_kv(self, num_blocks: int) -> None:
        """One spare block past `num_blocks`: padded rows of a CUDA graph write there."""
        for attn in self.model.attention_layers():
            shape = (num_blocks + 1, self.block_size, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.engine.plan.kv_dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.engine.plan.kv_dtype, device=self.device)

    def allocate(self, num_blocks: int) -> None:
        """Allocate the KV cache (every rank the same number of blocks), then capture graphs."""
        self.num_blocks = num_blocks
        self._allocate_kv(num_blocks)
        m = self.mapping
        # One stage only: a graph cannot wait for another stage's activations. NCCL all-reduces
        # of a TP group run inside the graph; the experts' all-to-all cannot (its sizes are the
        # step's routing, read on the host).
        graphs = m.pp == 1 and self.engine.plan.expert_exchange == "all-reduce"
        if self.device.type == "cuda" and self.use_cuda_graphs and graphs:
            plan = self.engine.plan
            short_contexts = ({b: self.kernels.short_context(b) for b in buckets(plan.max_batch_size)}
                              if self.kernels else {})
            log.info("capturing decode graphs")
            with torch.inference_mode():
                self.graphs = DecodeGraphs(self.model, plan.max_batch_size, -(-plan.max_seq_len // self.block_size),
                                           num_blocks, self.block_size, self.device, short_contexts)

    def run(self, step: Step) -> StepOutput | None:
        """Run this rank's part of `step`. Rank 0 gets the StepOutput; other ranks get None."""
        return self.collect(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: Step) -> Launched | None:
        """Queue this rank's part of `step` on the device and return without waiting for it;
        rank 0 gets what `collect` turns into its StepOutput, other ranks None. With stages
        after rank 0's, the sampled ids are still on their way when this returns."""
        m = self.mapping
        prev = None if step.prev_rows is None else self.last_sampled
        # a decode step's graph takes its inputs all from prev's ids or all from the host
        if self.graphs is not None and self.graphs.fits(step) and (prev is None or (step.prev_rows >= 0).all()):
            with self._busy():
                logits, greedy = self.graphs.run(step, prev)
                if len(step.sample_rows) < step.num_seqs:  # in a decode step every sequence samples, but be exact
                    rows = to_device(step.sample_rows, self.device)
                    logits, greedy = logits[rows], greedy[rows]
            return self._sample(step, logits, greedy)
        device = self.device
        positions = to_device(step.positions, device)
        meta = AttentionMetadata(
            slot_mapping=to_device(step.slot_mapping, device),
            query_start=step.query_start.tolist(),
            context_lens=step.context_lens.tolist(),
            # int64, as the decode graphs' inputs: other types would compile decode kernels mid-run
            block_tables=to_device(step.block_tables, device, torch.int64),
            context_lens_tensor=to_device(step.context_lens, device),
            decode=step.num_tokens == step.num_seqs,
            num_decodes=_leading_decodes(step.query_start),
        )
        last_tokens = to_device(self._logit_rows(step), device) if m.is_last_stage else None
        if m.is_first_stage:
            inputs = to_device(step.token_ids, device)
            if prev is not None:
                from_prev = np.flatnonzero(step.prev_rows >= 0)
                sampled = prev[to_device(step.prev_rows[from_prev], device)]
                inputs[to_device(step.query_start[from_prev], device)] = sampled
        else:
            inputs = torch.empty(step.num_tokens, self.hidden_size, dtype=self.engine.dtype, device=device)
            self.comm.recv(inputs, m.prev_stage_rank())
        with self._busy():
            hidden = self.model(inputs, positions, meta)
        if not m.is_last_stage:
            self.comm.send(hidden, m.next_stage_rank())
            return self._receive_output(step) if m.rank == 0 else None
        with self._busy():
            logits = self.model.compute_logits(hidden[last_tokens])[:len(step.sample_rows)]
        return self._sample(step, logits)

    def _logit_rows(self, step: Step) -> np.ndarray:
        """The hidden rows whose logits the step samples: each sampling sequence's last token.
        With decode graphs, padded (repeating the last) to a graph's batch: cuBLAS loads its
        kernel for a row count the process has not run yet, and that load waits for all the
        queued GPU work (40 ms of host time on an H200, at 7 of 12 new row counts). The
        graphs' capture ran every bucket's LM-head GEMM."""
        rows = step.query_start[step.sample_rows + 1] - 1
        if self.graphs is None or not len(rows):
            return rows
        return np.pad(rows, (0, self.graphs.bucket(len(rows)) - len(rows)), mode="edge")

    def collect(self, launched: Launched | None) -> StepOutput | None:
        """Wait for a launched step's sampled ids to reach the host."""
        if launched is None:
            return None
        for wait in launched.waits:
            wait()
        return StepOutput(launched.token_ids.tolist(), launched.logprobs, launched.logits)

    @contextmanager
    def _busy(self) -> Iterator[None]:
        """Count the work inside as busy time: the host's on the CPU, the device's on a GPU
        (spans on one stream never overlap; they are added up once they have run)."""
        if self.device.type == "cpu":
            start = time.perf_counter()
            yield
            self.busy_s += time.perf_counter() - start
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._spans.append((start, end))
        self._count_spans()

    def _count_spans(self) -> None:
        while self._spans and self._spans[0][1].query():
            start, end = self._spans.popleft()
            self.busy_s += start.elapsed_time(end) / 1e3

    def busy_seconds(self) -> float:
        """Time this rank has spent on forwards and sampling since it started."""
        if self._spans:
            torch.cuda.synchronize(self.device)
            self._count_spans()
        return self.busy_s

    def _sample(self, step: Step, logits: torch.Tensor, greedy: torch.Tensor | None = None) -> Launched | None:
        """On the last stage: sample, and get the tokens to rank 0. `greedy`, the logits'
        argmax from the graph, is the sample itself when every row is plain greedy. The sampled
        ids stay on the device as `last_sampled`, which a later Step's prev_rows may name."""
        m = self.mapping
        if m.rank != m.sampler_rank() or not len(step.sample_rows):
            if m.is_first_stage and len(step.sample_rows) and plain_greedy(step):
                # A TP peer of the sampling rank, on the stage whose inputs are token ids: the
                # gathered logits are the same bits here, so their argmax is the sample.
                self.last_sampled = greedy if greedy is not None else logits.argmax(-1)
            return self._to_host(torch.empty(0, dtype=torch.int64)) if m.rank == 0 else None
        plain = plain_greedy(step)
        with self._busy():
            if plain and greedy is None:  # an eager step: the argmax of the model's dtype is float32's
                greedy = logits.argmax(-1)
            if not plain:
                logits = logits.float()
            sampled = Sampled(greedy, None) if plain else sample(logits, step)
            # only the rows that asked, copied out of what may be a graph's output
            returned_logits = (None if step.return_logits is None
                               else logits[to_device(step.return_logits, self.device)].float())
        # Perhaps a view of a graph's output, which the next replay overwrites: a step taking
        # its inputs from here gathers them before its own replay.
        self.last_sampled = sampled.token_ids
        if m.rank == 0:
            return self._to_host(sampled.token_ids, sampled.logprobs, returned_logits)
        for tensor in (sampled.token_ids, sampled.logprobs, returned_logits):
            if tensor is not None:
                self.comm.send(tensor, 0)
        return None

    def _receive_output(self, step: Step) -> Launched:
        """Rank 0, when another rank samples: the same tensors, in the order they are sent,
        received without waiting (the next micro-batch may be launched meanwhile)."""
        rows, src = len(step.sample_rows), self.mapping.sampler_rank()
        if rows == 0:
            return self._to_host(torch.empty(0, dtype=torch.int64))
        ids = torch.empty(rows, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        waits = [self.comm.recv_async(ids, src)]
        logprobs = logits = None
        if len(step.num_logprobs) and step.num_logprobs.max() >= 0:
            logprobs = torch.empty(rows, 1 + 2 * int(step.num_logprobs.max()), device=self.device)
            waits.append(self.comm.recv_async(logprobs, src))
        if step.return_logits is not None:
            logits = torch.empty(len(step.return_logits), self.engine.config.vocab_size, device=self.device)
            waits.append(self.comm.recv_async(logits, src))
        return Launched(ids, waits, logprobs, logits)

    def _to_host(self, ids: torch.Tensor, logprobs: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None) -> Launched:
        """Start copying the sampled ids to the host, behind the step's work on the stream: no
        sync here, `collect` waits for the event."""
        if ids.device.type == "cpu":
            return Launched(ids, [], logprobs, logits)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)  # one per step: the last may not be read yet
        host.copy_(ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Launched(host, [ready.synchronize], logprobs, logits)

    def release(self) -> None:
        """Give back the KV cache and graphs (GPU memory) once this runner is done. Call it before
        closing the communicators: a graph holding NCCL kernels, destroyed after its
        communicator, left both ranks of a TP=2 job waiting forever at exit."""
        if self.graphs is not None:
            self.graphs.close()
        self.graphs = None
        self._allocate_kv(-1)
        gc.unfreeze()  # what world._load froze may be collected again (the runner's cycles among it)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def stats(self) -> dict:
        """This rank's figures: peak resident memory, peak GPU memory on a GPU, busy time so far."""
        stats = {"rank": self.mapping.rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                 "busy_s": self.busy_seconds()}
        if self.device.type == "cuda":
            stats["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return stats


def plain_greedy(step: Step) -> bool:
    """Every row takes the argmax of the raw logits: no temperature, penalties, logit biases or logprobs."""
    return (not step.temperature.any() and not len(step.history) and step.bias_start is None
            and bool((step.num_logprobs < 0).all()))


def _leading_decodes(query_start) -> int:
    """How many sequences at the front of a step bring one token each."""
    lens = query_start[1:] - query_start[:-1]
    others = (lens != 1).nonzero()[0]
    return int(others[0]) if len(others) else len(lens)


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor], file) -> None:
    """Put the rank file's tensors in place of the meta parameters; a tied parameter is
    replaced everywhere it is used. A quantized GEMM weight comes with `<name>_scale`, which
    goes to its layer's `weight_scale`, and a calibrated fp8 one with `<layer>.input_scale`;
    an int4 one (packed, int32 [out, in / 8]) also with `<name>_zero` (`weight_zero`) and,
    under act-order, `<layer>.g_idx`."""
    params = dict(model.named_parameters())
    tensors = dict(weights)
    scales = {name: tensors.pop(name + SCALE_SUFFIX) for name in params if name + SCALE_SUFFIX in tensors}
    input_scales = {name: tensors.pop(input_scale_name(name)) for name in scales if input_scale_name(name) in tensors}
    zeros = {name: tensors.pop(name + ZERO_SUFFIX) for name in scales if name + ZERO_SUFFIX in tensors}
    g_idx = {name: tensors.pop(g_idx_name(name)) for name in zeros if g_idx_name(name) in tensors}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise EngineError(f"{file}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    users: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            users.setdefault(id(param), []).append((module, attr))
    for name, param in params.items():
        tensor = tensors[name]
        shape = (param.shape[0], param.shape[1] // NIBBLES) if name in zeros else param.shape  # int4: packed
        if tensor.shape != shape:
            raise EngineError(f"{file}: {name} has shape {list(tensor.shape)}, the plan says {list(shape)}")
        quantized, int4 = tensor.dtype in (torch.int8, FP8, torch.int32), tensor.dtype == torch.int32
        if (name in scales) != quantized or (name in zeros) != int4:
            raise EngineError(f"{file}: {name} is {tensor.dtype} {'with' if name in scales else 'without'} a scale"
                              f"{' and zero points' if name in zeros else ''}")
        new = nn.Parameter(tensor, requires_grad=False)
        for module, attr in users[id(param)]:
            setattr(module, attr, new)
            if name in scales:
                check_device(tensor.dtype, tensor.device)
                setattr(module, f"{attr}_scale", scales[name])
                module.input_scale = input_scales.get(name)
                if name in zeros:
                    setattr(module, f"{attr}_zero", zeros[name])
                    module.g_idx = g_idx.get(name)

