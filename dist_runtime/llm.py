"""The Python API: `LLM(engine_dir)`, then `generate`, `stream` or `submit`."""

from __future__ import annotations

import atexit
from collections.abc import Iterator

from dist_runtime.coordinator import Coordinator
from dist_runtime.engine import Engine
from dist_runtime.engine_loop import EngineLoop, RequestHandle
from dist_runtime.errors import RequestError
from dist_runtime.liveness import DEFAULT_RANK_TIMEOUT_S, RankLostError
from dist_runtime.outputs import RequestOutput, StreamChunk
from dist_runtime.rank_info import RankInfo
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.tokenizer import Tokenizer
from dist_runtime.world import check_world, join, serve_as_worker
from launch.local import LocalWorkers
from launch.rank_info import from_environment

Prompt = str | list[int]


class LLM:
    """Runs an engine across its ranks. Under a launcher (mpirun) every rank constructs an
    LLM: rank 0 gets the API, every other rank serves steps inside the constructor and then
    exits the process when rank 0 shuts down. With no launcher, the engine's other ranks are
    spawned on this host, or with `launcher="ray"` started as actors on the Ray cluster at
    `ray_address` ("auto": the one this host belongs to).

    `num_kv_blocks` and `prefix_caching` override the engine's KV-cache settings (a small
    pool shows preemption at work). A rank that dies, or is silent or stuck in one step for
    `rank_timeout_s`, ends the engine: every request in flight gets a RankLostError naming it.
    `overlap` schedules each step while the device runs the one before (pp = 1), or
    keeps one micro-batch in flight per pipeline stage (pp > 1); the tokens are the same without it."""

    def __init__(self, engine_dir: str, device: str = "cpu", verify: bool = True, num_kv_blocks: int | None = None,
                 prefix_caching: bool = True, kv_cache_fraction: float = 0.9, launcher: str = "local",
                 ray_address: str | None = None, rank_timeout_s: float = DEFAULT_RANK_TIMEOUT_S,
                 overlap: bool = True) -> None:
        if launcher not in ("local", "ray"):
            raise RequestError(f"launcher must be 'local' or 'ray', not {launcher!r}")
        self.engine = Engine.load(engine_dir)
        # read before any rank starts: a broken tokenizer file stops nothing but this call
        self.tokenizer = Tokenizer(engine_dir) if (self.engine.path / "tokenizer.json").is_file() else None
        self.device = device
        self._workers = None  # LocalWorkers or RayWorkers: rank0, expect_exit(), stop(), kill()
        self._loop: EngineLoop | None = None
        info = from_environment()
        if info is None:
            if self.engine.world_size == 1:
                info = RankInfo(0, 1)
            elif launcher == "ray":
                from launch.ray import RayWorkers  # ray is an optional extra

                self._workers = RayWorkers(engine_dir, self.engine.world_size, device, verify, kv_cache_fraction,
                                           rank_timeout_s, ray_address)
                info = self._workers.rank0
            else:
                self._workers = LocalWorkers(engine_dir, self.engine.world_size,
                                             ["--device", device, "--kv-cache-fraction", str(kv_cache_fraction),
                                              "--rank-timeout", str(rank_timeout_s)]
                                             + ([] if verify else ["--no-verify"]))
                info = self._workers.rank0
        check_world(self.engine, info)
        self.rank = info.rank
        try:
            runner, self._liveness = join(self.engine, info, device, verify, kv_cache_fraction, rank_timeout_s)
        except BaseException:
            self._kill_workers()
            raise
        if info.rank != 0:
            serve_as_worker(runner, self._liveness)
            raise SystemExit(0)
        eos = tuple(self.engine.config.eos_token_ids) + (self.tokenizer.eos_ids if self.tokenizer else ())
        self.coordinator = Coordinator(self.engine, runner, runner.comm, eos, num_kv_blocks, prefix_caching,
                                       self._liveness.activity, overlap)
        self._comm = runner.comm
        self._loop = EngineLoop(self.coordinator, self.tokenizer, self._liveness)
        self._liveness.on_lost.append(self._on_rank_lost)
        if self._workers:
            self._workers.hand_over()
        atexit.register(self.shutdown)

    def _on_rank_lost(self, error: RankLostError) -> None:
        """On the watch's thread: fail every request, and end spawned ranks (a hung one too)."""
        loop = self._loop  # None once the caller has aborted on its own
        if loop is not None:
            loop.fail(error)
        if self._workers:
            self._workers.kill_now()

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
        `return_logits`, each output carries its logits; steps run meanwhile (other callers'
        too) then wait for their tokens before the next is launched, until this call returns."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        self.coordinator.return_logits = return_logits
        try:
            handles = [self.submit(p, sp) for p, sp in zip(prompts, params)]
            return [h.result() for h in handles]
        finally:
            self.coordinator.return_logits = False

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
        error = self._loop.error or self._liveness.failure
        return None if error is None else str(error)

    @property
    def max_seq_len(self) -> int:
        """Tokens a sequence may hold, prompt and output together."""
        return self.coordinator.max_seq_len

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
        if self._workers:
            self._workers.expect_exit()
        self._liveness.leave()
        try:
            loop.stop()
            self.coordinator.runner.release()  # before the communicators: see ModelRunner.release
            if loop.error is None:
                self._comm.close()
        finally:
            self._liveness.close()
            if self._workers:
                self._workers.stop()

    def abort(self) -> None:
        """Stop without talking to the other ranks (one may be dead): end spawned ranks at once.
        Under an external launcher, exiting rank 0 makes the launcher end the rest."""
        self._loop = None
        self._kill_workers()
        if getattr(self, "_liveness", None):
            self._liveness.close()

    def _kill_workers(self) -> None:
        if self._workers:
            self._workers.kill()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.shutdown()
        else:
            self.abort()
