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
            model, loading = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
            # synth wrote every tensor transformers' own class reads, in its shape, and no other
            assert not any(loading.values()), loading
            model.eval()
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


def _generate_under_mpirun_equals_transformers(engine, ranks: int, runs, tmp_path) -> None:
    logits_file = tmp_path / "logits.safetensors"
    args = ["generate", str(engine), "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json",
            "--save-logits", str(logits_file)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    outputs = json_lines(mpirun(ranks, *args))
    assert [o["prompt"] for o in outputs] == PROMPTS
    _check_against_reference(outputs, logits_file, runs)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_greedy_tokens_and_logits_equal_transformers_under_mpirun(arch, tp, pp, engines, reference, tmp_path):
    _generate_under_mpirun_equals_transformers(engines(arch, tp, pp), tp * pp, reference(arch), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-tied", "mistral"])
def test_tied_embeddings_and_sliding_window_equal_transformers(name, engines, reference, tmp_path):
    """llama-tied: tied embeddings split over two stages (the last stage gets its own copy) and
    a transformers-5 config; mistral: keys older than the window are not attended."""
    _generate_under_mpirun_equals_transformers(engines(name, 2, 2), 4, reference(name), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (1, 2), (2, 1)])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3"])
def test_qwen2_qwen3_and_phi3_equal_transformers_under_mpirun(family, tp, pp, engines, reference, tmp_path):
    """qwen2: q, k and v biased (o_proj not), a window on layers 2 and 3 only; qwen3: q and k
    normed per head before rotary, head_dim apart from hidden / heads; phi3: each rank's q, k,
    v, gate and up cut from the checkpoint's fused tensors, half of each head rotated."""
    _generate_under_mpirun_equals_transformers(engines(family, tp, pp), tp * pp, reference(family), tmp_path)
