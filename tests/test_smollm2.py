"""A real trained model, SmolLM2-135M-Instruct (see conftest.smollm2): what random weights
cannot show. Greedy text equals Hugging Face's, on one rank and on three."""

from __future__ import annotations

import pytest
import torch

from dist_runtime import LLM, SamplingParams
from sharding.builder import build_engine

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def expected(smollm2) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    outs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        outs.append(out[0, ids.shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("tp", [1, 3])
def test_greedy_tokens_equal_transformers_on_real_weights(smollm2, expected, tmp_path, tp):
    engine = tmp_path / "eng"
    build_engine(smollm2, engine, tp, 1, "fp32", progress=False, max_batch_size=4, max_seq_len=64)
    with LLM(str(engine)) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert "Paris" in outs[0].text
