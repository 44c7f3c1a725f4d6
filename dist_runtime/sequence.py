"""A request's state on rank 0: its tokens, its KV blocks, how far it has run."""

from __future__ import annotations

import enum

from dist_runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.seq_id = seq_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.seed = seed
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.block_table: list[int] = []
        self.num_cached = 0  # tokens whose keys and values are in the KV cache
        self.logits: list = []  # per generated token, when the caller asked for them

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
