"""Greedy tokens and logits of sharded engines on real ranks (mpirun) equal Hugging Face
transformers on the same float32 checkpoint."""

from __future__ import annotations

import pytest
from conftest import assert_equal_to_transformers, generate_under_mpirun

LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_greedy_tokens_and_logits_equal_transformers_under_mpirun(arch, tp, pp, engines, reference, tmp_path):
    assert_equal_to_transformers(*generate_under_mpirun(engines(arch, tp, pp), tp * pp, tmp_path), reference(arch))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tied", "mistral"])
def test_tied_embeddings_and_sliding_window_equal_transformers(name, engines, reference, tmp_path):
    """llama-tied: tied embeddings split over two stages (the last stage gets its own copy) and
    a transformers-5 config; mistral: keys older than the window are not attended."""
    assert_equal_to_transformers(*generate_under_mpirun(engines(name, 2, 2), 4, tmp_path), reference(name))


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (1, 2), (2, 1)])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3"])
def test_qwen2_qwen3_and_phi3_equal_transformers_under_mpirun(family, tp, pp, engines, reference, tmp_path):
    """qwen2: q, k and v biased (o_proj not), a window on layers 2 and 3 only; qwen3: q and k
    normed per head before rotary, head_dim apart from hidden / heads; phi3: each rank's q, k,
    v, gate and up cut from the checkpoint's fused tensors, half of each head rotated."""
    assert_equal_to_transformers(*generate_under_mpirun(engines(family, tp, pp), tp * pp, tmp_path), reference(family))
