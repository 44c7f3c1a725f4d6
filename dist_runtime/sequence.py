"""A sequence's state on rank 0: its tokens, its KV blocks, how far it has run."""

from __future__ import annotations

import enum
import time

from dist_runtime.outputs import TokenLogprobs
from dist_runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion: a request with n > 1 has n sequences sharing its prompt."""

    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, seed: int, index: int = 0) -> None:
        self.seq_id = seq_id
        self.index = index  # which of the request's n completions
        self.tokens = list(prompt_ids)  # prompt, then generated tokens
        self.num_prompt = len(prompt_ids)
        self.params = params
        self.seed = seed
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of the full blocks registered so far
        self.num_cached = 0  # tokens whose keys and values are in the KV cache
        self.num_in_flight = 0  # tokens that launched steps compute, not yet in num_cached
        self.num_placeholders = 0  # tokens those steps sample, not yet in `tokens` (their ids are on the device)
        self.cached_prompt_tokens = 0  # of those, found in the prefix cache when admitted
        self.logprobs: list[TokenLogprobs] = []
        self.logits: list = []  # per generated token, when the caller asked for them
        self.arrival_time = time.perf_counter()
        self.token_times: list[float] = []  # when each generated token reached rank 0

    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens[: self.num_prompt]

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_unscheduled(self) -> int:
        """Tokens, placeholders included, that no step has computed or taken yet."""
        return len(self.tokens) + self.num_placeholders - self.num_cached - self.num_in_flight

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
