"""Sampling from logits: filters, seeds, and the distribution it draws from."""

from __future__ import annotations

import numpy as np
import torch

from dist_runtime.sampler import apply_penalties, filter_logits, sample, uniform_noise
from dist_runtime.step import Step


def _step(n: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, index=0, penalties=(1.0, 0.0, 0.0),
          history: list[list[int]] | None = None, prompt_len: int = 0, logprobs: int = -1) -> Step:
    """A Step whose n rows all sample with the same settings (the forward-pass fields stay empty)."""
    empty = np.zeros(0, dtype=np.int64)
    flat = [t for h in history or [] for t in h]
    starts = np.cumsum([0] + [len(h) for h in history]) if history else np.zeros(n + 1, dtype=np.int64)
    return Step(token_ids=empty, positions=empty, slot_mapping=empty, query_start=np.arange(n + 1),
                context_lens=np.ones(n, dtype=np.int64), block_tables=np.zeros((n, 1), dtype=np.int32),
                sample_rows=np.arange(n), temperature=np.full(n, temperature, np.float32), top_k=np.full(n, top_k),
                top_p=np.full(n, top_p, np.float32), min_p=np.full(n, min_p, np.float32),
                seeds=np.array(seeds if seeds is not None else range(n)), sample_index=np.full(n, index),
                num_logprobs=np.full(n, logprobs), penalties=np.tile(np.array(penalties, np.float32), (n, 1)),
                history=np.array(flat, dtype=np.int64), history_start=np.asarray(starts, dtype=np.int64),
                history_prompt_len=np.full(n, prompt_len))


def test_greedy_takes_the_largest_logit():
    logits = torch.randn(5, 100)
    assert sample(logits, _step(5, temperature=0.0)).token_ids.tolist() == logits.argmax(-1).tolist()


def _kept(logits, top_k=0, top_p=1.0, min_p=0.0) -> list[bool]:
    """Which tokens of one row survive the filters (run as a batch of two different rows)."""
    rows = torch.stack([logits, torch.zeros_like(logits)])
    f32 = np.float32
    out = filter_logits(rows, np.array([top_k, 0]), np.array([top_p, 1.0], f32), np.array([min_p, 0.0], f32))
    assert torch.isfinite(out[1]).all()  # the other row keeps everything
    return torch.isfinite(out[0]).tolist()


def test_top_k_keeps_exactly_the_k_largest():
    assert _kept(torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5]), top_k=2) == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    assert _kept(probs.log(), top_p=0.75) == [False, True, True, False]  # 0.5 + 0.3 reaches 0.75
    assert sum(_kept(probs.log(), top_p=0.01)) == 1  # the top token always stays
    assert _kept(probs.log(), top_k=3, top_p=0.75) == [False, True, True, False]


def test_same_seed_and_position_draw_the_same_token_whatever_the_batch():
    logits = torch.randn(1, 1000)
    alone = sample(logits, _step(1, seeds=[42], index=3)).token_ids
    batch = torch.cat([torch.randn(3, 1000), logits])
    together = sample(batch, _step(4, seeds=[1, 2, 3, 42], index=3)).token_ids
    assert together[3] == alone[0]


def test_draws_follow_the_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    expected = logits.softmax(-1)[0]
    counts = torch.zeros(4)
    for seed in range(4000):
        counts[sample(logits, _step(1, seeds=[seed])).token_ids[0]] += 1
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_low_temperature_concentrates_on_the_top_token():
    logits = torch.tensor([[1.0, 0.9, 0.8]])
    picks = [sample(logits, _step(1, temperature=0.01, seeds=[s])).token_ids.item() for s in range(50)]
    assert picks == [0] * 50


def test_min_p_drops_tokens_far_less_likely_than_the_top():
    probs = torch.tensor([0.6, 0.3, 0.08, 0.02])
    assert _kept(probs.log(), min_p=0.1) == [True, True, True, False]  # 0.02 < 0.1 x 0.6


def test_noise_is_uniform_and_a_function_of_seed_index_and_token():
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 50_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert torch.equal(uniform_noise(torch.tensor([2]), torch.tensor([0]), 50_000)[0], u[2])


def test_repetition_penalty_follows_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 50)
    history = [3, 7, 7, 20, 41]
    ours = apply_penalties(logits[0], torch.tensor(history), 2, 1.3, 0.0, 0.0)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits.clone())[0]
    assert torch.allclose(ours, theirs)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(10)
    out = apply_penalties(logits, torch.tensor([5, 5, 1, 1, 1, 2]), 2, 1.0, 0.5, 0.25)  # output: 1, 1, 1, 2
    assert out[5] == 0  # only in the prompt
    assert out[1] == -(0.5 + 3 * 0.25) and out[2] == -(0.5 + 0.25)


def test_greedy_with_penalty_avoids_the_repeated_token():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    step = _step(1, temperature=0.0, penalties=(2.0, 0.0, 0.0), history=[[0]], prompt_len=1)
    assert sample(logits, step).token_ids.item() == 1


def test_logprobs_are_the_models_own_with_the_top_n():
    logits = torch.randn(2, 30)
    out = sample(logits, _step(2, temperature=0.0, logprobs=3))
    expected = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs[:, 0], expected.max(-1).values)
    top = expected.topk(3)
    assert out.logprobs[:, 1:4].long().equal(top.indices) and torch.allclose(out.logprobs[:, 4:], top.values)


def test_every_accepted_value_reaches_the_tensors_intact():
    """Seeds anywhere in int64, a top_k past the vocabulary, and a top_p or temperature that
    rounds to 0 in float32 each still draw the likely token, not an arbitrary one."""
    logits = torch.tensor([[1.0, 5.0, 0.0, -2.0]])
    for seed in (-(1 << 63), -1, (1 << 63) - 1):
        assert sample(logits, _step(1, temperature=0.01, seeds=[seed])).token_ids.item() == 1
    assert _kept(logits[0], top_k=(1 << 31) - 1) == [True] * 4
    assert _kept(logits[0], top_p=1e-50) == [False, True, False, False]
    assert sample(logits, _step(1, temperature=1e-40)).token_ids.item() == 1  # not 0, the first to overflow


def test_logit_biases_move_only_their_own_rows_tokens_and_not_the_logprobs():
    import dataclasses

    logits = torch.tensor([[1.0, 5.0, 0.0], [1.0, 5.0, 0.0], [1.0, 5.0, 0.0]])
    step = dataclasses.replace(_step(3, temperature=0.0, logprobs=0), bias_start=np.array([0, 1, 1, 3]),
                               bias_ids=np.array([2, 0, 1]), bias_values=np.array([10.0, 100.0, -100.0], np.float32))
    out = sample(logits, step)
    assert out.token_ids.tolist() == [2, 1, 0]  # biased, untouched, biased twice
    assert torch.allclose(out.logprobs[:, 0], logits.log_softmax(-1)[[0, 1, 2], [2, 1, 0]])  # the model's own
