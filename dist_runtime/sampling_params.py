"""How a request wants its tokens chosen, how many completions, and when each stops.

Every numeric bound lives in LIMITS, read both here (the Python API) and by the HTTP request
models (dist_runtime/server/protocol.py), so a value is checked against one rule wherever it
enters, and every value that reaches a tensor fits its dtype."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from dist_runtime.errors import RequestError

INT32_MAX = (1 << 31) - 1


@dataclasses.dataclass(frozen=True)
class Limit:
    """An int or finite float in [low, high] (low excluded when `low_open`)."""

    kind: type
    low: float
    high: float
    low_open: bool = False

    def problem(self, value) -> str | None:
        """What is wrong with `value`, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return f"must be {'a number' if self.kind is float else 'an integer'}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if value < self.low or (self.low_open and value == self.low) or value > self.high:
            return f"must be in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}], got {value}"
        return None


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


LIMITS = {
    "max_tokens": Limit(int, 1, INT32_MAX),
    "temperature": Limit(float, 0.0, 100.0),
    "top_k": Limit(int, 0, INT32_MAX),  # at or past the vocabulary size it keeps every token
    "top_p": Limit(float, 0.0, 1.0, low_open=True),
    "min_p": Limit(float, 0.0, 1.0),
    "repetition_penalty": Limit(float, 0.01, 100.0),  # a smaller divisor pushes logits to inf
    "presence_penalty": Limit(float, -2.0, 2.0),
    "frequency_penalty": Limit(float, -2.0, 2.0),
    # OpenAI's seed is an int64, Triton's random_seed a uint64: both are taken, as the int64 of the same bits
    "seed": Limit(int, -(1 << 63), (1 << 64) - 1),
    "n": Limit(int, 1, 128),
    "logprobs": Limit(int, 0, 20),
    "stop_token_id": Limit(int, 0, INT32_MAX),
    "logit_bias": Limit(float, -100.0, 100.0),
    "logit_bias_token": Limit(int, 0, INT32_MAX),
}
MAX_STOP_STRINGS = 16


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (HF's rule)
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    stop: tuple[str, ...] = ()  # stop strings: the text ends before them
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # completions per prompt
    logprobs: int | None = None  # log-probabilities of the sampled token and the top-N others
    detokenize: bool = True  # False: token ids only (benchmarks), stop strings then unavailable
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit)
    return_logits: bool = False  # this request's float32 logits at each sampled position come back with it

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((token, value) for token, value in bias))
        for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "n"):
            _check(name, getattr(self, name))
        if self.seed is not None:
            _check("seed", self.seed)
            object.__setattr__(self, "seed", _int64(self.seed))
        if self.logprobs is not None:
            _check("logprobs", self.logprobs)
        for token in self.stop_token_ids:
            _check("stop_token_id", token, "stop_token_ids")
        for token, value in self.logit_bias:
            _check("logit_bias_token", token, "logit_bias")
            _check("logit_bias", value)
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", "stop")
        if not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop: stop strings must be non-empty strings", "stop")
        if stop and not self.detokenize:
            raise RequestError("stop: stop strings need detokenize=True", "stop")

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _check(limit: str, value, field: str | None = None) -> None:
    problem = LIMITS[limit].problem(value)
    if problem:
        raise RequestError(f"{field or limit} {problem}", field or limit)
