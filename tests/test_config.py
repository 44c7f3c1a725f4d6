"""Reading config.json in both transformers layouts, and refusing what we cannot run."""

from __future__ import annotations

import json

import pytest

from dist_runtime.config import ModelConfig
from dist_runtime.errors import CheckpointError
from dist_runtime.presets import PRESETS, preset_config, to_transformers5_layout


@pytest.mark.parametrize("arch,name", [(a, p) for a in PRESETS for p in PRESETS[a]])
def test_transformers4_and_5_layouts_read_the_same(arch, name):
    config = preset_config(name, arch)
    assert ModelConfig.from_hf(config) == ModelConfig.from_hf(to_transformers5_layout(config))


def test_llama31_rope_scaling_is_read_from_either_layout():
    c4 = preset_config("llama-3.1-8b")
    c = ModelConfig.from_hf(c4)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    legacy = dict(c4, rope_scaling={**c4["rope_scaling"], "type": c4["rope_scaling"].pop("rope_type")})
    assert ModelConfig.from_hf(legacy).rope_scaling == c.rope_scaling


def test_gptj_fields_map_to_ours():
    c = ModelConfig.from_hf(preset_config("gpt-j-6b"))
    assert (c.architecture, c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim, c.rotary_dim) == (
        "gptj", 4096, 16384, 16, 256, 64)


def test_unknown_model_type_is_named():
    with pytest.raises(CheckpointError, match="unknown model_type 'bert'"):
        ModelConfig.from_hf({"model_type": "bert"})


def test_unsupported_rope_type_is_named():
    config = preset_config("llama-3-8b") | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_hf(config)


def test_missing_or_broken_config_json_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)


def test_config_round_trips_through_engine_json():
    c = ModelConfig.from_hf(preset_config("llama-3.1-405b"))
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_qwen_sliding_window_applies_only_with_use_sliding_window_from_max_window_layers_on():
    qwen = preset_config("qwen2.5-7b")  # sliding_window 131072, use_sliding_window false
    c = ModelConfig.from_hf(qwen)
    assert c.sliding_window is None and {c.window_of(i) for i in range(c.num_layers)} == {None}
    on = ModelConfig.from_hf(qwen | {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20})
    assert [on.window_of(i) for i in (0, 19, 20, 27)] == [None, None, 4096, 4096]
    listed = ["full_attention", "sliding_attention"] * 14  # transformers 5 writes the list itself
    assert ModelConfig.from_hf(qwen | {"use_sliding_window": True, "layer_types": listed}).layer_types == tuple(listed)


def test_qwen2_biases_q_k_and_v_but_not_o_proj_whatever_attention_bias_says():
    for attention_bias in (None, False, True):
        c = ModelConfig.from_hf(preset_config("qwen2.5-0.5b") | {"attention_bias": attention_bias})
        assert (c.qkv_bias, c.o_proj_bias, c.tie_word_embeddings) == (True, False, True)
    llama = ModelConfig.from_hf(preset_config("llama-3-8b") | {"attention_bias": True})
    assert (llama.qkv_bias, llama.o_proj_bias) == (True, True)


def test_qwen3_keeps_its_explicit_head_dim():
    c = ModelConfig.from_hf(preset_config("qwen3-32b"))
    assert (c.architecture, c.hidden_size, c.num_heads, c.head_dim, c.qkv_bias) == ("qwen3", 5120, 64, 128, False)


def test_phi3_partial_rotary_factor_reads_from_either_layout():
    phi = preset_config("phi-3-mini")
    assert ModelConfig.from_hf(phi).rotary_dim == 96 and ModelConfig.from_hf(phi).sliding_window == 2047
    partial = phi | {"partial_rotary_factor": 0.75}
    assert ModelConfig.from_hf(partial).rotary_dim == ModelConfig.from_hf(to_transformers5_layout(partial)).rotary_dim
    assert ModelConfig.from_hf(partial).rotary_dim == 72


def test_phi3_longrope_keeps_the_original_positions_and_transformers_attention_factor():
    """Phi-3.5-mini: 131,072 positions, 4,096 original. Within those transformers rotates by
    short_factor and scales cos and sin by sqrt(1 + ln 32 / ln 4096); past them it switches to
    long_factor and recomputes the whole sequence, which a paged cache cannot follow."""
    factors = {"short_factor": [1.0] * 48, "long_factor": [2.0] * 48}
    phi35 = preset_config("phi-3-mini") | {"max_position_embeddings": 131072, "sliding_window": 262144,
                                           "rope_scaling": {"type": "longrope", **factors}}
    c = ModelConfig.from_hf(phi35)
    assert c.max_position_embeddings == 4096
    assert c.rope_scaling == {"rope_type": "longrope", "short_factor": [1.0] * 48,
                              "original_max_position_embeddings": 4096, "attention_factor": 1.1902380714238083}
    assert ModelConfig.from_hf(to_transformers5_layout(phi35 | {"rope_scaling": {"rope_type": "longrope",
                                                                                  **factors}})) == c
    assert ModelConfig.from_hf(phi35 | {"rope_scaling": {"type": "su", **factors}}) == c  # its older name
    with pytest.raises(CheckpointError, match="short_factor has 47 entries; the 96 rotated dims of a head need 48"):
        ModelConfig.from_hf(phi35 | {"rope_scaling": {"type": "longrope", **factors, "short_factor": [1.0] * 47}})
