"""Token sampling from full-vocabulary logits, in the order vLLM and Hugging Face apply it:
penalties and logit biases, then greedy or temperature, top-k, top-p and min-p, then a seeded draw.

Draws use the Gumbel-max trick with noise that is a pure function of (the request's seed,
the index of the token being drawn, the vocabulary id), computed by integer hashing on
whatever device holds the logits: no generator state, no per-row loop, no host sync, and a
request's tokens depend on its own seed only, whatever else is in the batch, whichever rank
samples, on CPU or GPU, and even after its sequence was preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dist_runtime.step import Step, to_device

# A lower temperature is greedy: dividing by it can overflow float32 (to inf), and a draw that
# cold is the argmax but for near-ties anyway.
MIN_TEMPERATURE = 1e-5


def _i64(constant: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def draw_seed(seed: int, index: int) -> int:
    """A seed derived from (seed, index), for the extra completions of an n > 1 request."""
    return (seed * 0x9E3779B97F4A7C15 + index) % (1 << 63)


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] uniforms in (0, 1): splitmix64 of (seed, index, token id), 24 bits each."""
    x = seeds[:, None] * _GOLDEN + index[:, None] * _MIX1 + torch.arange(vocab, device=seeds.device) * _MIX2
    x = (x ^ _shift(x, 30)) * _MIX1
    x = (x ^ _shift(x, 27)) * _MIX2
    x = x ^ _shift(x, 31)
    return (_shift(x, 40).float() + 0.5) / float(1 << 24)


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


def filter_logits(logits: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray) -> torch.Tensor:
    """[rows, vocab] logits with -inf outside each row's top-k (0 = all), outside the smallest
    set whose probability reaches top_p, and below min_p x the likeliest token's probability.
    Which filters run is decided from the host's arrays: a test of device values would wait for
    the step's forward, and keep the next step from being queued meanwhile."""
    vocab, device = logits.shape[-1], logits.device
    if (top_k > 0).any() or (top_p < 1).any():
        ordered, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)
        k = to_device(np.where(top_k > 0, top_k, vocab), device)[:, None]
        probs = ordered.softmax(-1)
        # drop a token past the k-th, or when the tokens before it already reach top_p; the first
        # always stays, even for a top_p that rounds to 0 in float32
        drop = (rank >= k) | ((probs.cumsum(-1) - probs >= to_device(top_p, device)[:, None]) & (rank > 0))
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    if (min_p > 0).any():
        probs = logits.softmax(-1)
        floor = to_device(min_p, device)[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits: torch.Tensor, step: Step) -> Sampled:
    """One token per row of `logits` [rows, vocab] (float32, rows as in step.sample_rows)."""
    raw = logits
    for r in np.flatnonzero(step.history_start[1:] > step.history_start[:-1]):
        history = to_device(step.history[step.history_start[r]:step.history_start[r + 1]], logits.device)
        rep, presence, frequency = step.penalties[r].tolist()
        if logits is raw:
            logits = raw.clone()
        logits[r] = apply_penalties(logits[r], history, int(step.history_prompt_len[r]), rep, presence, frequency)
    if step.bias_start is not None:
        rows = np.repeat(np.arange(len(step.bias_start) - 1), np.diff(step.bias_start))
        logits = logits.index_put((to_device(rows, logits.device), to_device(step.bias_ids, logits.device)),
                                  to_device(step.bias_values, logits.device), accumulate=True)
    ids = logits.argmax(-1)
    rows = np.flatnonzero(step.temperature >= MIN_TEMPERATURE)
    if len(rows):
        device = logits.device
        pick = to_device(rows, device)
        param = lambda a: to_device(a[rows], device)  # noqa: E731
        scaled = logits[pick] / param(step.temperature)[:, None]
        scaled = filter_logits(scaled, step.top_k[rows], step.top_p[rows], step.min_p[rows])
        gumbel = -torch.log(-torch.log(uniform_noise(param(step.seeds), param(step.sample_index), scaled.shape[-1])))
        ids[pick] = (scaled + gumbel).argmax(-1)
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
