"""The model configuration we run, read from a Hugging Face `config.json` of either layout.

transformers 4 writes `rope_theta`, `rope_scaling` and `torch_dtype`; transformers 5 writes
`rope_parameters` (theta and scaling in one dict) and `dtype`. Both map to one `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from dist_runtime.errors import CheckpointError

# model_type -> the model file that runs it (models/__init__.py MODELS)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3", "phi3": "phi3",
                 "mixtral": "mixtral", "qwen3_moe": "qwen3_moe", "gptj": "gptj",
                 "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma"}
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
# (qkv bias, o_proj bias) that transformers' model class fixes, whatever attention_bias says
FIXED_BIASES = {"qwen2": (True, False), "phi3": (False, False)}


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """A mixture of experts (Mixtral, Qwen3-MoE): `num_experts` SiLU-gated MLPs of
    `intermediate_size`, `top_k` of them per token, weighted by their softmax probabilities,
    renormalised over the chosen ones when `norm_topk_prob`. `dense_layers` (Qwen3-MoE's
    mlp_only_layers, and those its decoder_sparse_step skips) have a plain MLP of the model's
    intermediate_size instead."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    dense_layers: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str  # which model file runs it (a value of ARCHITECTURES)
    model_type: str  # as the checkpoint names it
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # < head_dim for partial rotary (GPT-J, Phi-3's partial_rotary_factor)
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    qkv_bias: bool  # q, k and v projections carry a bias (Qwen2; Llama's attention_bias)
    o_proj_bias: bool  # the attention output projection carries one (Llama's attention_bias)
    mlp_bias: bool
    sliding_window: int | None  # keys a "sliding_attention" layer sees, itself included
    layer_types: tuple[str, ...]  # per layer: "full_attention" or "sliding_attention", as transformers names them
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str  # the checkpoint's own dtype, e.g. "bfloat16"
    moe: MoeConfig | None = None  # None: a dense model
    # Gemma 2 and 3 (None elsewhere): the soft caps, tanh(x / cap) * cap, of the attention scores
    # and of the final logits; the attention scale, query_pre_attn_scalar**-0.5 (not head_dim's);
    # the sliding-window layers' own rotary base, unscaled (Gemma 3: rope_local_base_freq)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    local_rope_theta: float | None = None
    weight_prefix: str = ""  # of every checkpoint tensor name (a multimodal Gemma 3's text model: "language_model.")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise CheckpointError(
                f"unknown model_type {model_type!r} in config.json; supported: {', '.join(ARCHITECTURES)}"
            )
        architecture = ARCHITECTURES[model_type]
        if architecture == "gemma":
            hf = gemma_text_config(hf)
        fields = {"gptj": _read_gptj, "gemma": _read_gemma}.get(architecture, _read_llama)(hf)
        theta, scaling = _rope(hf)
        if scaling is not None and scaling["rope_type"] == "longrope":  # exact only within the original context
            original = scaling["original_max_position_embeddings"]
            fields["max_position_embeddings"] = min(fields["max_position_embeddings"], original)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        fields.update(
            architecture=architecture,
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            rope_theta=theta,
            rope_scaling=scaling,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            moe=_read_moe(hf),
        )
        config = cls(**fields)
        config.validate()
        return config

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(read_config_json(path))

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"{self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads"
            )
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise CheckpointError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        factors = (self.rope_scaling or {}).get("short_factor")
        if factors is not None and len(factors) != self.rotary_dim // 2:
            raise CheckpointError(f"longrope's short_factor has {len(factors)} entries; the {self.rotary_dim} "
                                  f"rotated dims of a head need {self.rotary_dim // 2}")
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise CheckpointError(f"layer_types {list(self.layer_types)} must name one of {', '.join(LAYER_TYPES)} "
                                  f"for each of the {self.num_layers} layers")
        if self.moe and not 0 < self.moe.top_k <= self.moe.num_experts:
            raise CheckpointError(f"num_experts_per_tok {self.moe.top_k} must be between 1 and the "
                                  f"{self.moe.num_experts} experts")

    @property
    def attention_scale(self) -> float:
        """What attention scores are multiplied by: head_dim**-0.5, or Gemma's query_pre_attn_scalar**-0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (global index), None where it sees every earlier key."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data, eos_token_ids=tuple(data["eos_token_ids"]), layer_types=tuple(data["layer_types"]))
        if data.get("moe"):
            data["moe"] = MoeConfig(**dict(data["moe"], dense_layers=tuple(data["moe"]["dense_layers"])))
        return cls(**data)


def read_config_json(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint folder?)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e


def _read_llama(hf: dict[str, Any]) -> dict[str, Any]:
    """Llama and the families that read like it: Mistral, Qwen2, Qwen3, Phi-3."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    layers = hf["num_hidden_layers"]
    qkv_bias = o_proj_bias = hf.get("attention_bias", False)
    if hf["model_type"] in FIXED_BIASES:
        qkv_bias, o_proj_bias = FIXED_BIASES[hf["model_type"]]
    window = hf.get("sliding_window")
    if hf["model_type"] in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None  # their checkpoints carry a sliding_window that applies only with use_sliding_window
    rotary_dim = head_dim
    if hf["model_type"] == "phi3":
        rotary_dim = int(head_dim * _partial_rotary_factor(hf))
    return dict(
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=qkv_bias,
        o_proj_bias=o_proj_bias,
        mlp_bias=hf.get("mlp_bias", False),
        sliding_window=window,
        layer_types=_layer_types(hf, layers, window),
    )


def _layer_types(hf: dict[str, Any], layers: int, window: int | None) -> tuple[str, ...]:
    """Which layers attend over the sliding window: as config.json lists them (transformers 5
    writes them), else Qwen's rule (the layers from max_window_layers on), else every layer
    when there is a window."""
    if window is None:
        return ("full_attention",) * layers
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    if hf["model_type"] in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", 28)  # transformers' default for both
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))
    return ("sliding_attention",) * layers


def _read_moe(hf: dict[str, Any]) -> MoeConfig | None:
    """Mixtral's num_local_experts or Qwen3-MoE's num_experts (transformers 5 writes the former for
    both); Mixtral always renormalises its top-k weights and names no norm_topk_prob."""
    experts = hf.get("num_local_experts") or hf.get("num_experts")
    if not experts:
        return None
    step, only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(hf["num_hidden_layers"]) if i in only or (i + 1) % step)
    return MoeConfig(experts, hf["num_experts_per_tok"], hf.get("moe_intermediate_size") or hf["intermediate_size"],
                     hf.get("norm_topk_prob", hf["model_type"] == "mixtral"), dense)


def _partial_rotary_factor(hf: dict[str, Any]) -> float:
    """The share of each head that is rotated: in rope_parameters (transformers 5) or at the top (4)."""
    params = hf.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0))


# What transformers' Gemma config classes take for a key config.json leaves out (a multimodal
# Gemma 3's text_config lists little more than its shape).
GEMMA_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
               "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "sliding_window_pattern": 6, "final_logit_softcapping": None,
                    "attn_logit_softcapping": None},
}
GEMMA_TEXT_PREFIX = "language_model."  # a multimodal Gemma 3's text tensors, as transformers saves them


def gemma_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A Gemma config.json as _read_gemma takes it: a multimodal Gemma 3's text_config (with the
    top level's token ids, dtype and tying over it), under transformers' defaults, with
    transformers 5's per-layer-type rope_parameters split into the global layers' rope_parameters
    and the local ones' rope_local_base_freq, and the layer pattern written out as layer_types."""
    prefix = ""
    if hf["model_type"] == "gemma3":
        if not isinstance(hf.get("text_config"), dict):
            raise CheckpointError("a gemma3 config.json without a text_config: no text model to serve")
        top = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "dtype", "torch_dtype", "tie_word_embeddings")
               if hf.get(k) is not None}
        hf, prefix = {**hf["text_config"], **top, "model_type": "gemma3_text"}, GEMMA_TEXT_PREFIX
    hf = {**GEMMA_DEFAULTS[hf["model_type"]], **hf, "weight_prefix": prefix}
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{hf['model_type']} with use_bidirectional_attention: only causal attention is served")
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and set(params) & set(LAYER_TYPES):  # transformers 5's Gemma 3
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(f"rope type {local['rope_type']!r} on the sliding-window layers: only the "
                                  f"default is supported there")
        hf["rope_theta"] = full.pop("rope_theta", hf["rope_theta"])
        hf["rope_local_base_freq"] = local.get("rope_theta", hf.get("rope_local_base_freq"))
        hf["rope_parameters"] = {**full, "rope_theta": hf["rope_theta"]}
    if not hf.get("layer_types"):
        pattern = 2 if hf["model_type"] == "gemma2" else (hf.get("sliding_window_pattern")
                                                          or hf.get("_sliding_window_pattern") or 6)
        hf["layer_types"] = gemma_layer_types(pattern, hf["num_hidden_layers"])
    return hf


def gemma_layer_types(pattern: int, layers: int) -> list[str]:
    """Every pattern-th layer global, the others local, as transformers lays them."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]


def _read_gemma(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2 and 3 (text): Llama's fields under Gemma's names, and what only Gemma has."""
    fields = _read_llama(hf)
    fields.update(
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        attn_logit_softcapping=hf.get("attn_logit_softcapping") if hf["model_type"] == "gemma2" else None,
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
        local_rope_theta=float(hf["rope_local_base_freq"]) if hf["model_type"] == "gemma3_text" else None,
        weight_prefix=hf["weight_prefix"],
    )
    return fields


def _read_gptj(hf: dict[str, Any]) -> dict[str, Any]:
    hidden = hf["n_embd"]
    heads = hf["n_head"]
    return dict(
        hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        rotary_dim=hf.get("rotary_dim") or hidden // heads,
        max_position_embeddings=hf.get("n_positions", 2048),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        hidden_act=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=False,
        o_proj_bias=False,
        mlp_bias=True,
        sliding_window=None,
        layer_types=("full_attention",) * hf["n_layer"],
    )


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4)."""
    params = hf.get("rope_parameters")
    if params is not None:
        scaling = dict(params)
        theta = scaling.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling.pop("partial_rotary_factor", None)  # read with the head's shape (_partial_rotary_factor)
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else None
    if scaling is not None:
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", "default")
        scaling.pop("type", None)
        if hf.get("model_type") == "phi3" and rope_type in ("su", "yarn"):
            rope_type = "longrope"  # Phi-3's older names for it, as transformers reads them
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **scaling}
        if rope_type == "longrope":
            scaling = _longrope(hf, scaling)
    return float(theta), scaling


def _longrope(hf: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's long-context rope as transformers computes it within the original context:
    frequencies divided by short_factor, cos and sin scaled by attention_factor (from the
    context's growth when not given). Past original_max_position_embeddings transformers
    switches to long_factor and recomputes the whole sequence, which a paged cache cannot
    follow: a model with longrope keeps that many positions (ModelConfig.from_hf)."""
    original = (hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                or hf["max_position_embeddings"])
    growth = scaling.get("factor") or hf["max_position_embeddings"] / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if growth <= 1 else math.sqrt(1 + math.log(growth) / math.log(original))
    return {"rope_type": "longrope", "short_factor": [float(f) for f in scaling["short_factor"]],
            "original_max_position_embeddings": original, "attention_factor": float(attention_factor)}
