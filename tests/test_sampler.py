"""Sampling from logits: filters, seeds, and the distribution it draws from."""

from __future__ import annotations

import numpy as np
import torch

from dist_runtime.sampler import filter_logits, sample
from dist_runtime.step import Step


def _step(n: int, temperature=1.0, top_k=0, top_p=1.0, seeds=None, index=0) -> Step:
    empty = np.zeros(0, dtype=np.int64)
    return Step(empty, empty, empty, np.zeros(n + 1, dtype=np.int64), np.ones(n, dtype=np.int64),
                np.zeros((n, 1), dtype=np.int32), np.full(n, temperature, np.float32), np.full(n, top_k),
                np.full(n, top_p, np.float32), np.array(seeds if seeds is not None else range(n)),
                np.full(n, index))


def test_greedy_takes_the_largest_logit():
    logits = torch.randn(5, 100)
    assert sample(logits, _step(5, temperature=0.0)).tolist() == logits.argmax(-1).tolist()


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    kept = torch.isfinite(filter_logits(logits, 2, 1.0))
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    kept = torch.isfinite(filter_logits(probs.log(), 0, 0.75))
    assert kept.tolist() == [False, True, True, False]  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(filter_logits(probs.log(), 0, 0.01)).sum() == 1  # the top token always stays


def test_same_seed_and_position_draw_the_same_token_whatever_the_batch():
    logits = torch.randn(1, 1000)
    alone = sample(logits, _step(1, seeds=[42], index=3))
    batch = torch.cat([torch.randn(3, 1000), logits])
    together = sample(batch, _step(4, seeds=[1, 2, 3, 42], index=3))
    assert together[3] == alone[0]


def test_draws_follow_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    expected = logits.softmax(-1)[0]
    counts = torch.zeros(4)
    for seed in range(4000):
        counts[sample(logits, _step(1, seeds=[seed]))[0]] += 1
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_low_temperature_concentrates_on_the_top_token():
    logits = torch.tensor([[1.0, 0.9, 0.8]])
    picks = [sample(logits, _step(1, temperature=0.01, seeds=[s])).item() for s in range(50)]
    assert picks == [0] * 50
