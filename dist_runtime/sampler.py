"""Token sampling from full-vocabulary logits, in the order vLLM and Hugging Face apply it:
penalties, then greedy or temperature, top-k, top-p and min-p, then a seeded draw.

Random draws are seeded per sequence and per position (seed, index of the token), never by a
shared generator: a request's tokens depend on its own seed only, whatever else is in the
batch, whichever rank samples, and even after its sequence was preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_runtime.step import Step

_MIX = 0x9E3779B97F4A7C15  # spreads consecutive (seed, index) pairs over the generator's seed space


def draw_seed(seed: int, index: int) -> int:
    return (seed * _MIX + index) % (1 << 63)


@dataclass
class Sampled:
    token_ids: torch.Tensor  # int64 [rows]
    logprobs: torch.Tensor | None  # float32 [rows, 1 + 2N]: sampled logprob, top-N ids, top-N logprobs


def apply_penalties(logits: torch.Tensor, history: torch.Tensor, prompt_len: int, repetition: float,
                    presence: float, frequency: float) -> torch.Tensor:
    """One row. Repetition (HF's rule) on prompt and output tokens; presence and frequency
    (OpenAI's rule) on output tokens only."""
    logits = logits.clone()
    if repetition != 1.0 and len(history):
        seen = history.unique()
        chosen = logits[seen]
        logits[seen] = torch.where(chosen > 0, chosen / repetition, chosen * repetition)
    output = history[prompt_len:]
    if (presence or frequency) and len(output):
        counts = torch.bincount(output, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """One row: logits outside the top-k, outside the smallest set whose probability reaches
    top_p, or less likely than min_p x the likeliest, set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, step: Step) -> Sampled:
    """One token per row of `logits` [rows, vocab] (float32, rows as in step.sample_rows)."""
    raw = logits
    for r in np.flatnonzero(step.history_start[1:] > step.history_start[:-1]):
        history = torch.from_numpy(step.history[step.history_start[r]:step.history_start[r + 1]]).to(logits.device)
        rep, presence, frequency = step.penalties[r].tolist()
        if logits is raw:
            logits = raw.clone()
        logits[r] = apply_penalties(logits[r], history, int(step.history_prompt_len[r]), rep, presence, frequency)
    ids = logits.argmax(-1)
    for r in np.flatnonzero(step.temperature > 0):
        row = filter_logits(logits[r] / float(step.temperature[r]), int(step.top_k[r]), float(step.top_p[r]),
                            float(step.min_p[r]))
        gen = torch.Generator(device=logits.device).manual_seed(draw_seed(int(step.seeds[r]),
                                                                          int(step.sample_index[r])))
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), one RNG call per row
        race = torch.empty_like(row).exponential_(generator=gen)
        ids[r] = (row.softmax(-1) / race).argmax()
    return Sampled(ids, _logprobs(raw, ids, step.num_logprobs))


def _logprobs(raw: torch.Tensor, ids: torch.Tensor, wanted: np.ndarray) -> torch.Tensor | None:
    """Log-probabilities under the model itself (before penalties and temperature)."""
    if not len(wanted) or wanted.max() < 0:
        return None
    n = int(wanted.max())
    logprobs = raw.log_softmax(-1)
    top = logprobs.topk(n, dim=-1) if n else None
    parts = [logprobs.gather(1, ids[:, None])]
    if top is not None:
        parts += [top.indices.to(logprobs.dtype), top.values]
    return torch.cat(parts, dim=1)
