"""Greedy tokens and logits of sharded engines on real ranks (mpirun) equal Hugging Face
transformers on the same float32 checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, json_lines, mpirun
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

MAX_TOKENS = 12
LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]


@pytest.fixture(scope="module")
def reference(checkpoints):
    """HF greedy generate per prompt: (prompt ids, generated ids, per-step logits)."""
    cache = {}

    def get(name: str) -> list[tuple[list[int], list[int], torch.Tensor]]:
        if name not in cache:
            path = checkpoints[name]
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            runs = []
            for prompt in PROMPTS:
                ids = tok.encode(prompt).ids
                out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=model.config.eos_token_id)
                runs.append((ids, out.sequences[0, len(ids):].tolist(), torch.cat(out.logits).float()))
            cache[name] = runs
        return cache[name]

    return get


def _check_against_reference(outputs, logits_file, runs):
    logits = load_file(logits_file)
    for i, (out, (_, ref_ids, ref_logits)) in enumerate(zip(outputs, runs)):
        assert out["token_ids"] == ref_ids, f"prompt {i}"
        ours = logits[f"prompt_{i}"]
        assert ours.shape == ref_logits.shape
        rel = ((ours - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert rel < 1e-4, f"prompt {i}: logits differ by {rel:.2e} relative"


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_greedy_tokens_and_logits_equal_transformers_under_mpirun(arch, tp, pp, engines, reference, tmp_path):
    engine = engines(arch, tp, pp)
    logits_file = tmp_path / "logits.safetensors"
    args = ["generate", str(engine), "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json",
            "--save-logits", str(logits_file)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    outputs = json_lines(mpirun(tp * pp, *args))
    assert [o["prompt"] for o in outputs] == PROMPTS
    _check_against_reference(outputs, logits_file, reference(arch))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tied", "mistral"])
def test_tied_embeddings_and_sliding_window_equal_transformers(name, engines, reference, tmp_path):
    """llama-tied: tied embeddings split over two stages (the last stage gets its own copy) and
    a transformers-5 config; mistral: keys older than the window are not attended."""
    engine = engines(name, 2, 2)
    logits_file = tmp_path / "logits.safetensors"
    args = ["generate", str(engine), "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json",
            "--save-logits", str(logits_file)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    _check_against_reference(json_lines(mpirun(4, *args)), logits_file, reference(name))
