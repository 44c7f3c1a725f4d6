"""The Python API: `LLM(model)`, then `generate`, `stream` or `submit`."""

from __future__ import annotations

import atexit
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dist_runtime.coordinator import Coordinator
from dist_runtime.engine import Engine
from dist_runtime.engine_cache import prepare
from dist_runtime.engine_loop import EngineLoop, RequestHandle
from dist_runtime.errors import RequestError
from dist_runtime.liveness import RankLostError
from dist_runtime.outputs import RequestOutput, StreamChunk
from dist_runtime.runtime_config import RuntimeConfig
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.tokenizer import Tokenizer
from launch.executors import executor_for
from launch.rank_info import from_environment

Prompt = str | list[int]


def _say(line: str) -> None:
    """Where the engine comes from: on stderr, from rank 0 only (every rank prepares it)."""
    info = from_environment()
    if info is None or info.rank == 0:
        print(line, file=sys.stderr)


class LLM:
    """Runs a model across its ranks, as `config` (a RuntimeConfig) says, with `options` (its
    fields: `LLM("eng/", device="cuda", rank_timeout_s=60)`) over it. `model` is an engine
    folder, or a Hugging Face checkpoint folder or Hub id, whose engine is built on first use
    (`LLM("./SmolLM2-135M-Instruct", tp=2, dtype="bf16")`; see engine_cache.py).

    Under mpirun or srun every rank runs the same program: on rank 0 `LLM(...)` drives the job,
    and on every other rank it serves rank 0's calls until rank 0 shuts down, then ends the
    process. With no launcher, the engine's other ranks are spawned on this host, or with
    `launcher="ray"` started as actors on the Ray cluster at `ray_address`.

    A rank that dies, or is silent or stuck in one step for `rank_timeout_s`, ends the engine:
    every request in flight gets a RankLostError naming it."""

    def __init__(self, model: str | Path | None = None, *, config: RuntimeConfig | None = None,
                 **options: Any) -> None:
        values = dataclasses.asdict(config) if config is not None else {}
        if model is not None:
            values["engine_dir"] = str(model)
        self.config = prepare(RuntimeConfig.from_dict(values | options, "LLM()"), say=_say)
        self.engine = Engine.load(self.config.engine_dir).serving(self.config)
        # read before any rank starts: a broken tokenizer file stops nothing but this call
        self.tokenizer = Tokenizer(self.config.engine_dir) if (self.engine.path / "tokenizer.json").is_file() else None
        self.device = self.config.device
        self._loop: EngineLoop | None = None
        self._executor = executor_for(self.config, self.engine)
        runner = self._executor.start()
        self._monitor = self._executor.monitor
        eos = tuple(self.engine.config.eos_token_ids) + (self.tokenizer.eos_ids if self.tokenizer else ())
        self.coordinator = Coordinator(self.engine, runner, self._executor, eos, self.config, self._monitor.activity)
        self._loop = EngineLoop(self.coordinator, self.tokenizer, self._monitor)
        self._monitor.on_lost.append(self._on_rank_lost)
        atexit.register(self.shutdown)

    def _on_rank_lost(self, error: RankLostError) -> None:
        """On the watch's thread: fail every request, and end the ranks this process started (a hung one too)."""
        loop = self._loop  # None once the caller has aborted on its own
        if loop is not None:
            loop.fail(error)
        self._executor.kill()

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, stream: bool = False,
               sink=None) -> RequestHandle:
        """Queue one request and return at once: call result(), or with stream=True iterate
        the handle for chunks as tokens come (or have `sink` called, on the engine's thread,
        with each chunk and then STREAM_END)."""
        if self._loop is None:
            raise RequestError("this LLM has been shut down")
        ids = self._encode(prompt)
        return self._loop.submit(prompt if isinstance(prompt, str) else None, ids, params or SamplingParams(), stream,
                                 sink)

    def generate(self, prompts: list[Prompt] | str, params: SamplingParams | list[SamplingParams] | None = None,
                 return_logits: bool = False) -> list[RequestOutput]:
        """Run every prompt (text or token ids) to the end; outputs in prompt order. With
        `return_logits`, each of these requests carries its logits (SamplingParams.return_logits)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        if return_logits:
            params = [dataclasses.replace(sp, return_logits=True) for sp in params]
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        return [h.result() for h in handles]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Chunks of new tokens and text as they come; leaving the loop early aborts the request."""
        handle = self.submit(prompt, params, stream=True)
        try:
            yield from handle
        finally:
            if not handle.done.is_set():
                handle.abort()

    @property
    def failed(self) -> str | None:
        """Why the engine stopped serving (a rank was lost), or None while it serves."""
        if self._loop is None:
            return "shut down"
        error = self._loop.error or self._monitor.failure
        return None if error is None else str(error)

    @property
    def max_seq_len(self) -> int:
        """Tokens a sequence may hold, prompt and output together."""
        return self.coordinator.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    def prompt_ids(self, prompt: Prompt, params: SamplingParams | None = None) -> list[int]:
        """The token ids `submit` would queue for `prompt`; a RequestError, naming the field,
        if this engine cannot serve it with `params`."""
        ids = self._encode(prompt)
        self.coordinator.check_request(ids, params or SamplingParams())
        return ids

    def load(self) -> dict:
        """Rank 0's counters of the moment, cheap enough for every metrics scrape: sequences
        running and waiting, KV blocks held and in all, preemptions so far."""
        c = self.coordinator
        return {"running": len(c.scheduler.running), "waiting": len(c.scheduler.waiting),
                "kv_blocks_used": c.blocks.num_used, "kv_blocks": c.blocks.num_blocks,
                "preemptions": c.scheduler.num_preemptions}

    def stats(self) -> dict:
        """Scheduler and KV-cache counters, and every rank's memory figures."""
        c = self.coordinator
        graphs = c.runner.graphs
        return {"preemptions": c.scheduler.num_preemptions, "kv_blocks": c.blocks.num_blocks,
                "kv_tokens": c.blocks.num_blocks * c.blocks.block_size,
                "cuda_graphs": None if graphs is None else {"batch_sizes": sorted({b for b, _ in graphs.graphs}),
                                                            "short_contexts": graphs.short_contexts,
                                                            "memory_bytes": graphs.memory_bytes},
                "kv_block_size": c.blocks.block_size, "kv_blocks_used": c.blocks.num_used,
                "kv_blocks_peak": c.peak_blocks_used, "prefix_cache_hit_tokens": c.blocks.hit_tokens,
                "prefix_cache_queried_tokens": c.blocks.queried_tokens, "ranks": self._loop.call(c.rank_stats)}

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.engine.path} has no tokenizer; pass token ids", "prompt")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def shutdown(self) -> None:
        """Stop every rank; also runs on context-manager and interpreter exit. Safe to call twice."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        atexit.unregister(self.shutdown)
        try:
            loop.stop()
        except BaseException:  # the engine thread may still talk to the ranks: no one else may
            self._executor.stop(clean=False)
            raise
        self._executor.stop(clean=loop.error is None)

    def abort(self) -> None:
        """Stop without talking to the other ranks (one may be dead): end the ranks this process
        started at once. Under an external launcher, exiting rank 0 makes the launcher end the rest."""
        self._loop = None
        self._executor.kill()
        self._executor.stop(clean=False)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.shutdown()
        else:
            self.abort()
