"""Token sampling from full-vocabulary logits: greedy, temperature, top-k, top-p.

Random draws are seeded per sequence and per position (seed, index of the token), never by a
shared generator: a request's tokens depend on its own seed only, whatever else is in the
batch and whichever rank samples.
"""

from __future__ import annotations

import numpy as np
import torch

from dist_runtime.step import Step

_MIX = 0x9E3779B97F4A7C15  # spreads consecutive (seed, index) pairs over the generator's seed space


def draw_seed(seed: int, index: int) -> int:
    return (seed * _MIX + index) % (1 << 63)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top-k, or outside the smallest set whose probability reaches top_p, set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, step: Step) -> torch.Tensor:
    """One token id per row of `logits` [seqs, vocab] (float32)."""
    ids = logits.argmax(-1)
    for i in np.flatnonzero(step.temperature > 0):
        row = filter_logits(logits[i] / float(step.temperature[i]), int(step.top_k[i]), float(step.top_p[i]))
        gen = torch.Generator(device=logits.device).manual_seed(draw_seed(int(step.seeds[i]),
                                                                          int(step.sample_index[i])))
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), one RNG call per row
        race = torch.empty_like(row).exponential_(generator=gen)
        ids[i] = (row.softmax(-1) / race).argmax()
    return ids
