"""What the API hands back: finished requests, and chunks while they stream."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class TokenLogprobs:
    """The sampled token's log-probability under the model, and the top-N alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" (eos, stop token or stop string), "length", "abort"
    logprobs: list[TokenLogprobs] | None = None
    logits: torch.Tensor | None = None  # [generated tokens, vocab] float32, when asked for

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)  # of completion 0

    # The first completion's fields, for the common n = 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclasses.dataclass
class StreamChunk:
    """New tokens and text of one completion since the last chunk."""

    request_id: int
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
