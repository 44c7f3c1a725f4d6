"""Mixtral and Qwen3-MoE against Hugging Face transformers on the same float32 checkpoints:
greedy tokens and logits in one process, and on real ranks (mpirun) over TP {1, 2, 4} x
PP {1, 2} and the expert-parallel layouts, with both ways the experts' outputs meet. The
checkpoints are written with transformers' own config classes and load into its own models;
their routers' k-th and (k+1)-th choices are far enough apart that no layout's rounding can
swap them."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import (
    SMALL_PLAN,
    assert_equal_to_transformers,
    generate_in_process,
    generate_under_mpirun,
    transformers_greedy,
)
from safetensors.torch import load_file

from dist_runtime import LLM
from dist_runtime.config import ModelConfig
from dist_runtime.presets import preset_config
from sharding.builder import build_engine, check_checkpoint
from sharding.checkpoint import Checkpoint
from sharding.synth import write_checkpoint

# (arch, tp, pp, ep, exchange): every TP x PP layout and every expert-parallel one, each once
LAYOUTS = [("mixtral", 1, 2, 1, "all-reduce"), ("qwen3_moe", 2, 1, 1, "all-reduce"),
           ("mixtral", 2, 2, 1, "all-reduce"), ("qwen3_moe", 4, 1, 1, "all-reduce"),
           ("mixtral", 4, 2, 1, "all-reduce"),
           ("qwen3_moe", 2, 1, 2, "all-to-all"), ("mixtral", 2, 2, 2, "all-reduce"),
           ("mixtral", 4, 1, 2, "all-to-all"), ("qwen3_moe", 4, 1, 2, "all-reduce"),
           ("qwen3_moe", 4, 1, 4, "all-to-all"), ("mixtral", 4, 1, 4, "all-reduce")]
MIN_ROUTER_GAP = 1e-4  # far above float32 rounding between layouts (about 1e-6 here)


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory) -> dict[str, object]:
    """mixtral: config.json as transformers 4 writes it (Mixtral renormalises its top 2 of 8);
    qwen3_moe: as transformers 5's Qwen3MoeConfig writes it (num_local_experts, rope_parameters;
    top 4 of 8 not renormalised, layer 2 dense)."""
    root = tmp_path_factory.mktemp("moe")
    qwen = transformers.Qwen3MoeConfig(**preset_config("tiny", "qwen3_moe")).to_dict()
    assert "num_local_experts" in qwen and "rope_parameters" in qwen
    return {"mixtral": write_checkpoint(preset_config("tiny", "mixtral"), root / "mixtral", seed=4, progress=False),
            "qwen3_moe": write_checkpoint(qwen, root / "qwen3_moe", seed=5, progress=False)}


@pytest.fixture(scope="module")
def moe_engines(moe_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-engines")
    built = {}

    def get(arch: str, tp: int, pp: int, ep: int = 1, exchange: str = "all-reduce"):
        key = (arch, tp, pp, ep, exchange)
        if key not in built:
            built[key] = root / "-".join(map(str, key))
            build_engine(moe_checkpoints[arch], built[key], tp, pp, "fp32", progress=False, ep=ep,
                         expert_exchange=exchange, **SMALL_PLAN)
        return built[key]

    return get


@pytest.fixture(scope="module")
def reference(moe_checkpoints):
    """transformers' greedy run (conftest.transformers_greedy), with the gap between every
    token's k-th and (k+1)-th router score on the way checked."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            gaps = []

            def gap(module, inputs, output):
                scores = torch.topk(output[0].float(), module.top_k + 1, dim=-1).values
                gaps.append((scores[:, -2] - scores[:, -1]).min().item())

            def watch(model):
                for layer in model.model.layers:
                    if hasattr(layer.mlp, "gate"):
                        layer.mlp.gate.register_forward_hook(gap)

            cache[arch] = transformers_greedy(moe_checkpoints[arch], watch)
            assert min(gaps) > MIN_ROUTER_GAP, f"{arch}: routing has a near-tie ({min(gaps):.1e})"
        return cache[arch]

    return get


def test_config_reads_experts_as_either_transformers_writes_them(moe_checkpoints):
    t5 = ModelConfig.from_dir(moe_checkpoints["qwen3_moe"]).moe
    t4 = ModelConfig.from_hf(preset_config("tiny", "qwen3_moe")).moe  # num_experts, rope_theta
    assert t4 == t5 and (t5.num_experts, t5.top_k, t5.intermediate_size) == (8, 4, 32)
    assert not t5.norm_topk_prob and t5.dense_layers == (2,)
    assert ModelConfig.from_dir(moe_checkpoints["mixtral"]).moe.norm_topk_prob  # Mixtral names none: always
    every_other = preset_config("tiny", "qwen3_moe") | {"decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert ModelConfig.from_hf(every_other).moe.dense_layers == (0, 2, 3)
    engine_json = ModelConfig.from_dict(json.loads(json.dumps(ModelConfig.from_hf(every_other).to_dict())))
    assert engine_json == ModelConfig.from_hf(every_other)


def test_experts_stacked_as_transformers_5_can_save_them_read_as_per_expert(moe_checkpoints, tmp_path):
    """save_pretrained(save_original_format=False) keeps transformers 5's own layout: one
    [experts, 2 x inter, hidden] tensor of every expert's gate and up rows, one of the down
    projections (and Mixtral's block named mlp, not block_sparse_moe)."""
    for arch, path in moe_checkpoints.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.save_pretrained(tmp_path / arch, save_original_format=False)
        stacked, per_expert = Checkpoint(tmp_path / arch), Checkpoint(path)
        assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / arch / "model.safetensors")
        check_checkpoint(stacked)
        assert len(stacked.stacked) == {"mixtral": 4 * (8 * 3 + 1), "qwen3_moe": 3 * 8 * 3}[arch]  # + renamed routers
        for name in per_expert.names():
            assert stacked.shape(name) == per_expert.shape(name)
            assert torch.equal(stacked.get(name), per_expert.get(name)), name


def test_each_rank_file_holds_only_its_experts_slices(moe_checkpoints, moe_engines):
    """TP 4 x EP 2: rank 3 holds experts 4-7, the second half of each one's rows (gate, up) and
    columns (down); attention stays split over all four ranks."""
    ck = Checkpoint(moe_checkpoints["mixtral"])
    rank3 = load_file(moe_engines("mixtral", 4, 1, 2) / "rank-00003.safetensors")
    layer = "model.layers.1.block_sparse_moe"
    expected_gate_up = torch.stack([torch.cat([ck.get(f"{layer}.experts.{e}.{w}.weight")[16:] for w in ("w1", "w3")])
                                    for e in range(4, 8)])
    assert torch.equal(rank3["model.layers.1.mlp.experts.gate_up_proj"], expected_gate_up)
    expected_down = torch.stack([ck.get(f"{layer}.experts.{e}.w2.weight")[:, 16:] for e in range(4, 8)])
    assert torch.equal(rank3["model.layers.1.mlp.experts.down_proj"], expected_down)
    assert torch.equal(rank3["model.layers.1.mlp.gate.weight"], ck.get(f"{layer}.gate.weight"))
    assert rank3["model.layers.1.self_attn.qkv_proj.weight"].shape[0] == (16 + 2 * 16)  # a quarter of the heads


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_greedy_tokens_and_logits_equal_transformers(arch, moe_engines, reference):
    with LLM(str(moe_engines(arch, 1, 1))) as llm:
        assert_equal_to_transformers(*generate_in_process(llm), reference(arch))


@pytest.mark.slow
@pytest.mark.parametrize("arch,tp,pp,ep,exchange", LAYOUTS)
def test_sharded_and_expert_parallel_engines_equal_transformers_under_mpirun(arch, tp, pp, ep, exchange,
                                                                              moe_engines, reference, tmp_path):
    engine = moe_engines(arch, tp, pp, ep, exchange)
    assert_equal_to_transformers(*generate_under_mpirun(engine, tp * pp, tmp_path), reference(arch))


@pytest.mark.slow
def test_a_mixture_served_from_its_checkpoint_folder_builds_the_expert_parallel_engine_asked_for(
        moe_checkpoints, reference, tmp_path):
    with LLM(moe_checkpoints["mixtral"], tp=2, ep=2, engine_cache=str(tmp_path)) as llm:
        assert (llm.engine.plan.tp, llm.engine.plan.ep) == (2, 2)
        assert_equal_to_transformers(*generate_in_process(llm), reference("mixtral"))
    assert [p.name.split("-")[1:4] for p in tmp_path.iterdir() if p.is_dir()] == [["tp2", "pp1", "ep2"]]
