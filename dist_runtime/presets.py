"""Model shapes by name, as Hugging Face `config.json` dicts (transformers 4 layout).

`tiny` presets are for tests and the demo; the others carry the real shapes of public models
so that `synth` can write a random-weight checkpoint of that size and `plan` can size it.
"""

from __future__ import annotations

import copy
from typing import Any

from dist_runtime.config import gemma_layer_types
from dist_runtime.errors import CheckpointError

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama(hidden, inter, layers, heads, kv, vocab, max_pos, theta, rope_scaling=None, tie=False,
           head_dim=None, eps=1e-5) -> dict[str, Any]:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": max_pos,
        "rope_theta": theta, "rope_scaling": rope_scaling, "rms_norm_eps": eps, "hidden_act": "silu",
        "tie_word_embeddings": tie, "attention_bias": False, "torch_dtype": "bfloat16",
    }
    if head_dim:
        config["head_dim"] = head_dim
    return config


def _mistral(hidden, inter, layers, heads, kv, vocab, max_pos, theta, window) -> dict[str, Any]:
    return _llama(hidden, inter, layers, heads, kv, vocab, max_pos, theta) | {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": window}


def _qwen(model_type, hidden, inter, layers, heads, kv, vocab, max_pos, tie, head_dim=None) -> dict[str, Any]:
    """Qwen2 / 2.5 (q, k and v biased) and Qwen3 (q and k normed per head, head_dim given):
    their checkpoints name a sliding window that use_sliding_window leaves off."""
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    return _llama(hidden, inter, layers, heads, kv, vocab, max_pos, 1000000.0, tie=tie, head_dim=head_dim,
                  eps=1e-6) | {"architectures": [arch], "model_type": model_type, "use_sliding_window": False,
                               "sliding_window": None if model_type == "qwen3" else max_pos,
                               "max_window_layers": layers}


def _mixtral(hidden, inter, layers, heads, kv, vocab, max_pos) -> dict[str, Any]:
    """Mixtral: Mistral's layers, each MLP 8 experts of `inter`, 2 per token; no sliding window."""
    return _llama(hidden, inter, layers, heads, kv, vocab, max_pos, 1000000.0) | {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8,
        "num_experts_per_tok": 2, "sliding_window": None}


def _qwen3_moe(hidden, inter, moe_inter, layers, heads, kv, experts, top_k) -> dict[str, Any]:
    """Qwen3-MoE: Qwen3's attention, every MLP `experts` of `moe_inter`, `top_k` per token, their
    weights renormalised (`inter`: the dense MLPs of mlp_only_layers, which the released models leave empty)."""
    return _qwen("qwen3", hidden, inter, layers, heads, kv, 151936, 40960, tie=False, head_dim=128) | {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "moe_intermediate_size": moe_inter,
        "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": []}


def _phi3(hidden, inter, layers, heads, kv, vocab, max_pos, window) -> dict[str, Any]:
    """Phi-3-mini-4k's layout: q, k and v (and gate and up) fused in the checkpoint."""
    return _llama(hidden, inter, layers, heads, kv, vocab, max_pos, 10000.0) | {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "original_max_position_embeddings": max_pos,
        "sliding_window": window, "pad_token_id": 32000}


def _gemma2(hidden, inter, layers, heads, kv, head_dim, query_scalar) -> dict[str, Any]:
    """Gemma 2: local (a 4,096-token window) and global layers in turn, soft caps of 50 on the
    attention scores and 30 on the logits, tied embeddings."""
    return {
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": 256000, "max_position_embeddings": 8192,
        "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_scalar, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "attention_bias": False,
        "torch_dtype": "bfloat16",
    }


def _gemma3(hidden, inter, layers, heads, kv, head_dim, vocab, max_pos, window, rope_scaling=None,
            query_scalar=256) -> dict[str, Any]:
    """Gemma 3's text model: five local layers (rotary base 10,000) to one global (1,000,000,
    scaled linearly by 8 from the 4B up), q and k normed per head, no soft caps, tied embeddings."""
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab, "max_position_embeddings": max_pos,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": rope_scaling, "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": query_scalar, "sliding_window": window,
        "sliding_window_pattern": 6, "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "tie_word_embeddings": True, "attention_bias": False, "torch_dtype": "bfloat16",
    }


def _gptj(hidden, layers, heads, rotary_dim, vocab, max_pos) -> dict[str, Any]:
    return {
        "architectures": ["GPTJForCausalLM"], "model_type": "gptj", "n_embd": hidden, "n_layer": layers,
        "n_head": heads, "rotary_dim": rotary_dim, "vocab_size": vocab, "n_positions": max_pos,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "float16",
    }


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "llama": {
        # GQA with fewer KV heads (2) than the largest TP (4), Llama 3.1 rope scaling.
        "tiny": _llama(64, 160, 4, 4, 2, 512, 512, 500000.0, dict(_LLAMA3_ROPE), head_dim=16) | {
            "torch_dtype": "float32"},
        "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, 131072, 500000.0,
                               dict(_LLAMA3_ROPE, factor=32.0), tie=True, head_dim=64),
        "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000, 4096, 10000.0, eps=1e-6) | {"torch_dtype": "float16"},
        "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256, 8192, 500000.0),
        "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128256, 131072, 500000.0, dict(_LLAMA3_ROPE)),
        "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128256, 8192, 500000.0),
        "llama-3.1-405b": _llama(16384, 53248, 126, 128, 8, 128256, 131072, 500000.0, dict(_LLAMA3_ROPE)),
    },
    "mistral": {
        "mistral-7b": _mistral(4096, 14336, 32, 32, 8, 32000, 32768, 10000.0, 4096),  # v0.1
    },
    "mixtral": {
        # 8 experts of 32 (TP 4 x EP 2 splits each over 2 ranks)
        "tiny": _mixtral(64, 32, 4, 4, 2, 512, 512) | {"head_dim": 16, "torch_dtype": "float32"},
        "mixtral-8x7b": _mixtral(4096, 14336, 32, 32, 8, 32000, 32768),
        "mixtral-8x22b": _mixtral(6144, 16384, 56, 48, 8, 32000, 65536),
    },
    "qwen3_moe": {
        # 4 of 8 experts per token, not renormalised, and layer 2 a dense MLP (mlp_only_layers)
        "tiny": _qwen3_moe(64, 96, 32, 4, 4, 2, 8, 4) | {
            "head_dim": 32, "vocab_size": 512, "max_position_embeddings": 512, "max_window_layers": 4,
            "norm_topk_prob": False, "mlp_only_layers": [2], "torch_dtype": "float32"},
        "qwen3-30b-a3b": _qwen3_moe(2048, 6144, 768, 48, 32, 4, 128, 8),
        "qwen3-235b-a22b": _qwen3_moe(4096, 12288, 1536, 94, 64, 4, 128, 8),
    },
    "qwen2": {
        # the sliding window on for the layers from max_window_layers on (here 2 and 3)
        "tiny": _qwen("qwen2", 64, 160, 4, 4, 2, 512, 512, tie=False) | {
            "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2, "torch_dtype": "float32"},
        "qwen2.5-0.5b": _qwen("qwen2", 896, 4864, 24, 14, 2, 151936, 32768, tie=True),
        "qwen2.5-7b": _qwen("qwen2", 3584, 18944, 28, 28, 4, 152064, 131072, tie=False),
    },
    "qwen3": {
        # head_dim 32, not hidden / heads (16), as Qwen3-32B's 128 is not 5120 / 64
        "tiny": _qwen("qwen3", 64, 160, 4, 4, 2, 512, 512, tie=False, head_dim=32) | {"torch_dtype": "float32"},
        "qwen3-0.6b": _qwen("qwen3", 1024, 3072, 28, 16, 8, 151936, 40960, tie=True, head_dim=128),
        "qwen3-8b": _qwen("qwen3", 4096, 12288, 36, 32, 8, 151936, 40960, tie=False, head_dim=128),
        "qwen3-32b": _qwen("qwen3", 5120, 25600, 64, 64, 8, 151936, 40960, tie=False, head_dim=128),
    },
    "phi3": {
        # half of each head rotated (Phi-4-mini rotates 3/4), a window shorter than the test sequences,
        # Phi-3.5's longrope (its 256 original positions are the ones served)
        "tiny": _phi3(64, 160, 4, 4, 2, 512, 1024, 8) | {
            "partial_rotary_factor": 0.5, "original_max_position_embeddings": 256, "pad_token_id": None,
            "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.25, 2.5, 6.0],
                             "long_factor": [1.5, 4.0, 12.0, 40.0]}, "torch_dtype": "float32"},
        "phi-3-mini": _phi3(3072, 8192, 32, 32, 32, 32064, 4096, 2047),  # Phi-3-mini-4k
    },
    "gemma2": {
        # windows of 8 (shorter than the test sequences), soft caps small enough to change the
        # scores and logits much, query_pre_attn_scalar not head_dim
        "tiny": _gemma2(64, 160, 4, 4, 2, 16, 32) | {
            "vocab_size": 512, "max_position_embeddings": 512, "sliding_window": 8, "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 10.0, "torch_dtype": "float32"},
        "gemma-2-2b": _gemma2(2304, 9216, 26, 8, 4, 256, 256),
        "gemma-2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256),
        "gemma-2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144),
    },
    "gemma3": {
        # every other layer global, head_dim 32 (not hidden / heads) and query_pre_attn_scalar
        # not head_dim, a local rotary base (100) far from the global one and a window of 8, so
        # that mixing them up shows
        "tiny": _gemma3(64, 160, 4, 4, 2, 32, 512, 512, 8, {"rope_type": "linear", "factor": 8.0}) | {
            "sliding_window_pattern": 2, "rope_local_base_freq": 100.0, "query_pre_attn_scalar": 64,
            "torch_dtype": "float32"},
        "gemma-3-1b": _gemma3(1152, 6912, 26, 4, 1, 256, 262144, 32768, 512),
        "gemma-3-4b": _gemma3(2560, 10240, 34, 8, 4, 256, 262208, 131072, 1024, {"rope_type": "linear", "factor": 8.0}),
        "gemma-3-12b": _gemma3(3840, 15360, 48, 16, 8, 256, 262208, 131072, 1024,
                               {"rope_type": "linear", "factor": 8.0}),
        "gemma-3-27b": _gemma3(5376, 21504, 62, 32, 16, 128, 262208, 131072, 1024,
                               {"rope_type": "linear", "factor": 8.0}, query_scalar=168),
    },
    "gptj": {
        "tiny": _gptj(64, 4, 4, 8, 512, 512) | {"torch_dtype": "float32"},
        "gpt-j-6b": _gptj(4096, 28, 16, 64, 50400, 2048),
    },
}


def preset_config(name: str, arch: str | None = None) -> dict[str, Any]:
    """The config of preset `name`; `arch` picks between presets of the same name (`tiny`)."""
    archs = [arch] if arch else [a for a in PRESETS if name in PRESETS[a]]
    for a in archs:
        if a not in PRESETS:
            raise CheckpointError(f"unknown architecture {a!r}; known: {', '.join(PRESETS)}")
        if name in PRESETS[a]:
            return copy.deepcopy(PRESETS[a][name])
    known = sorted({f"{a}:{p}" for a in PRESETS for p in PRESETS[a]})
    raise CheckpointError(f"unknown preset {name!r}{f' for {arch}' if arch else ''}; known: {', '.join(known)}")


def to_transformers5_layout(config: dict[str, Any]) -> dict[str, Any]:
    """The same config as transformers 5 writes it: `rope_parameters` and `dtype`."""
    config = dict(config)
    config["dtype"] = config.pop("torch_dtype")
    if config["model_type"] != "gptj":
        params = {"rope_type": "default", **(config.pop("rope_scaling") or {})}
        params["rope_theta"] = config.pop("rope_theta")
        if "partial_rotary_factor" in config:
            params["partial_rotary_factor"] = config.pop("partial_rotary_factor")
        config["rope_parameters"] = params
    if config["model_type"] == "gemma3_text":  # rotary per layer type, and the layer pattern written out
        local = {"rope_type": "default", "rope_theta": config.pop("rope_local_base_freq")}
        config["rope_parameters"] = {"full_attention": config["rope_parameters"], "sliding_attention": local}
        config["layer_types"] = gemma_layer_types(config.pop("sliding_window_pattern"), config["num_hidden_layers"])
    return config
