"""Gemma 2 and Gemma 3: their config.json read alike in both transformers layouts and as
transformers' own config classes write them; greedy tokens and logits of sharded float32
engines on real ranks (mpirun) equal Hugging Face transformers on the same checkpoint (local
and global layers in turn, windows shorter than the prompts, soft caps small enough to change
the scores and the logits); a multimodal Gemma 3 checkpoint serves its text model."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from conftest import assert_equal_to_transformers, generate_under_mpirun, transformers_greedy
from safetensors.torch import load_file
from transformers import AutoConfig

from dist_runtime.config import ModelConfig
from dist_runtime.errors import CheckpointError
from dist_runtime.presets import PRESETS, preset_config, to_transformers5_layout
from sharding.builder import build_engine

SMALL_PLAN = dict(max_batch_size=4, max_seq_len=128)


def _shape(config: ModelConfig) -> dict:
    """What a config means for the model (the token ids and dtype aside)."""
    return dataclasses.replace(config, bos_token_id=None, eos_token_ids=(), dtype="").to_dict()


@pytest.mark.parametrize("name,family", [(n, f) for f in ("gemma2", "gemma3") for n in PRESETS[f]])
def test_gemma_configs_read_alike_in_both_layouts_and_as_transformers_writes_them(name, family):
    preset = preset_config(name, family)
    config = ModelConfig.from_hf(preset)
    assert config.architecture == "gemma" and config.layer_types.count("full_attention") >= 1
    assert ModelConfig.from_hf(to_transformers5_layout(preset)) == config
    written = AutoConfig.for_model(**preset).to_dict()  # transformers 5's own layout and defaults
    assert _shape(ModelConfig.from_hf(written)) == _shape(config)


def test_gemma3_globals_rotate_by_their_scaled_base_and_locals_by_theirs():
    config = ModelConfig.from_hf(preset_config("gemma-3-4b"))
    assert config.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert (config.rope_theta, config.rope_scaling, config.local_rope_theta) == (
        1e6, {"rope_type": "linear", "factor": 8.0}, 1e4)
    assert config.window_of(0) == 1024 and config.window_of(5) is None
    assert config.query_pre_attn_scalar == 256 and config.attn_logit_softcapping is None


def test_a_multimodal_gemma3_config_is_read_as_its_text_model():
    """As the Hub's gemma-3-4b-it lays it out: a text_config of little more than its shape,
    the token ids and dtype at the top; its tensors under `language_model.`."""
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "torch_dtype": "bfloat16", "text_config": {
               "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
               "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
               "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model"}}
    config = ModelConfig.from_hf(hub)
    assert _shape(config) == _shape(ModelConfig.from_hf(preset_config("gemma-3-4b"))) | {
        "model_type": "gemma3", "weight_prefix": "language_model."}
    assert config.eos_token_ids == (1, 106) and config.dtype == "bfloat16"


@pytest.mark.parametrize("config,error", [
    ({"model_type": "gemma3", "vision_config": {}}, "without a text_config"),
    (preset_config("tiny", "gemma3") | {"use_bidirectional_attention": True}, "only causal attention"),
    (to_transformers5_layout(preset_config("tiny", "gemma3")) | {"rope_parameters": {
        "full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "sliding-window layers"),
])
def test_gemma_configs_we_cannot_run_are_refused_by_name(config, error):
    with pytest.raises(CheckpointError, match=error):
        ModelConfig.from_hf(config)


LAYOUTS = [(2, 2), (1, 1), pytest.param(2, 1, marks=pytest.mark.slow), pytest.param(1, 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_greedy_tokens_and_logits_equal_transformers_under_mpirun(family, tp, pp, engines, reference,
                                                                        tmp_path):
    assert_equal_to_transformers(*generate_under_mpirun(engines(family, tp, pp), tp * pp, tmp_path), reference(family))


def _multimodal_checkpoint(text_checkpoint, out):
    """A Gemma3ForConditionalGeneration holding the text checkpoint's weights (a tiny vision
    tower beside them, untouched), as transformers saves it, with the text checkpoint's tokenizer."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = json.loads((text_checkpoint / "config.json").read_text())
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    vocab = text["vocab_size"]
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, dtype="float32",
                          boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1)
    model = Gemma3ForConditionalGeneration(config)
    weights = load_file(text_checkpoint / "model.safetensors")
    model.model.language_model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(text_checkpoint / name, out / name)
    return out


@pytest.mark.slow
def test_a_multimodal_gemma3_checkpoint_serves_its_text_model_as_transformers_does(checkpoints, tmp_path):
    checkpoint = _multimodal_checkpoint(checkpoints["gemma3"], tmp_path / "ckpt")
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "gemma3"
    engine = tmp_path / "engine"
    build_engine(checkpoint, engine, 2, 1, "fp32", progress=False, **SMALL_PLAN)
    runs = transformers_greedy(checkpoint)
    assert [ids for _, ids, _ in runs] == [ids for _, ids, _ in transformers_greedy(checkpoints["gemma3"])]
    assert_equal_to_transformers(*generate_under_mpirun(engine, 2, tmp_path), runs)
