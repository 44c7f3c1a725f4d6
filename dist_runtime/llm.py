"""The Python API: `LLM(engine_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import atexit
import dataclasses

import torch

from dist_runtime.coordinator import Coordinator, serve_steps
from dist_runtime.engine import Engine
from dist_runtime.errors import RequestError
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.tokenizer import Tokenizer
from dist_runtime.world import check_world, join
from launch.local import LocalWorkers
from launch.rank_info import RankInfo, from_environment


@dataclasses.dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logits: torch.Tensor | None = None  # [generated tokens, vocab] float32, when asked for


class LLM:
    """Runs an engine across its ranks. Under a launcher (mpirun) every rank constructs an
    LLM: rank 0 gets the API, every other rank serves steps inside the constructor and then
    exits the process when rank 0 shuts down. With no launcher, the engine's other ranks are
    spawned on this host."""

    def __init__(self, engine_dir: str, device: str = "cpu", verify: bool = True) -> None:
        self.engine = Engine.load(engine_dir)
        self._workers: LocalWorkers | None = None
        self._closed = True
        info = from_environment()
        if info is None:
            if self.engine.world_size == 1:
                info = RankInfo(0, 1)
            else:
                self._workers = LocalWorkers(engine_dir, self.engine.world_size,
                                             ["--device", device] + ([] if verify else ["--no-verify"]))
                info = self._workers.rank0
        check_world(self.engine, info)
        self.rank = info.rank
        try:
            runner = join(self.engine, info, device, verify)
        except BaseException:
            self._kill_workers()
            raise
        if info.rank != 0:
            try:
                serve_steps(runner, runner.comm)
            finally:
                runner.comm.close()
            raise SystemExit(0)
        self.tokenizer = Tokenizer(engine_dir) if (self.engine.path / "tokenizer.json").is_file() else None
        eos = tuple(self.engine.config.eos_token_ids) + (self.tokenizer.eos_ids if self.tokenizer else ())
        self.coordinator = Coordinator(self.engine, runner, runner.comm, eos)
        self._comm = runner.comm
        self._closed = False
        atexit.register(self.shutdown)

    def generate(self, prompts: list[str | list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None,
                 return_logits: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) in one batch; outputs in prompt order."""
        if self._closed:
            raise RequestError("this LLM has been shut down")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        seqs = [self.coordinator.add_request(self._encode(p), sp) for p, sp in zip(prompts, params)]
        self.coordinator.return_logits = return_logits
        while self.coordinator.has_work():
            self.coordinator.step()
        return [RequestOutput(p if isinstance(p, str) else None, s.prompt_ids, s.output_ids,
                              self._decode(s.output_ids), s.finish_reason,
                              torch.stack(s.logits) if return_logits else None) for p, s in zip(prompts, seqs)]

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.engine.path} has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        vocab = self.engine.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return list(prompt)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer else ""

    def shutdown(self) -> None:
        """Stop every rank; also runs on interpreter exit. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._workers:
            self._workers.expect_exit()
        try:
            self.coordinator.shutdown()
            self._comm.close()
        finally:
            if self._workers:
                self._workers.stop()

    def abort(self) -> None:
        """Stop without talking to the other ranks (one may be dead): end spawned ranks at once.
        Under an external launcher, exiting rank 0 makes the launcher end the rest."""
        self._closed = True
        self._kill_workers()

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
