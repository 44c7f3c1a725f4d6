"""The planner: who holds what, how much memory it takes, and clear refusals."""

from __future__ import annotations

import json

import pytest
from conftest import cli

from dist_runtime.config import ModelConfig
from dist_runtime.errors import PlanError
from dist_runtime.presets import preset_config
from sharding.planner import GiB, make_plan, smallest_fitting_plan


def _config(name: str, arch: str | None = None, **overrides) -> ModelConfig:
    return ModelConfig.from_hf(preset_config(name, arch) | overrides)


def _weights(plan, rank: int) -> dict:
    return {w.name: w for w in plan.ranks[rank].weights}


def test_heads_that_do_not_divide_by_tp_are_refused_with_the_numbers():
    with pytest.raises(PlanError, match="32 attention heads do not divide by tp=3"):
        make_plan(_config("llama-3-8b"), tp=3)


def test_int4_row_slices_of_partial_int32_words_are_refused_with_the_sizes():
    # one group over the whole input (GPTQ's group_size -1) still packs 8 values a word: 100 columns are
    # 12.5 words, so a rank's slice of the packed words would not be its columns
    with pytest.raises(PlanError, match=r"down_proj: its 200 input columns over tp=2 give each rank 100, not a "
                                        r"whole number of int32 words of 8 int4 values"):
        make_plan(_config("tiny", "llama", intermediate_size=200), tp=2, dtype="int4", group_size=-1)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(PlanError, match="pp=5 stages need at least 5 layers; the model has 4"):
        make_plan(_config("tiny", "llama"), pp=5)


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    plan = make_plan(_config("tiny", "llama"), tp=4, dtype="fp32")  # 4 query heads, 2 KV heads, head_dim 16
    qkv = [_weights(plan, r)["model.layers.0.self_attn.qkv_proj.weight"] for r in range(4)]
    assert all(w.shape == [16 + 2 * 16, 64] for w in qkv)  # one query head + one (shared) KV head each
    assert qkv[0].parallel == "column"
    assert qkv[0].sources == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]


def test_vocab_is_padded_so_every_rank_holds_the_same_rows():
    plan = make_plan(_config("tiny", "llama", vocab_size=509), tp=4, dtype="fp32")
    rows = [_weights(plan, r)["model.embed_tokens.weight"].shape[0] for r in range(4)]
    assert rows == [128] * 4


def test_uneven_layer_splits_are_allowed_and_checked():
    plan = make_plan(_config("tiny", "llama"), pp=2, layer_counts=[3, 1])
    assert [r.layers for r in plan.ranks] == [[0, 3], [3, 4]]
    assert make_plan(_config("llama-3-8b"), pp=3).layer_counts == [11, 11, 10]
    with pytest.raises(PlanError, match="at least one layer"):
        make_plan(_config("tiny", "llama"), pp=2, layer_counts=[4, 0])


def test_memory_estimate_counts_weights_exactly():
    config = _config("llama-3-8b")
    total_weights = sum(r.memory["weights"] for r in make_plan(config, pp=2, dtype="bf16").ranks)
    assert total_weights == 2 * 8_030_261_248  # Llama-3-8B has 8.03e9 parameters, 2 bytes each
    tp2 = sum(r.memory["weights"] for r in make_plan(config, tp=2, pp=2, dtype="bf16").ranks)
    norms = (2 * 32 + 1) * 4096  # replicated on both TP ranks
    assert tp2 == total_weights + 2 * norms
    fp8 = make_plan(config, tp=2, pp=2, dtype="fp8")
    assert sum(r.memory["weights"] for r in fp8.ranks) < 0.6 * total_weights


def test_llama_70b_fits_tp8_on_80gb_gpus():
    plan = make_plan(_config("llama-3-70b"), tp=8, dtype="bf16", gpu_mem_gib=80)
    assert plan.fits
    assert 16 * GiB < plan.largest_rank().memory["weights"] < 18 * GiB


def test_llama_405b_needs_more_than_one_node_in_bf16_and_fits_one_in_fp8():
    config = _config("llama-3.1-405b")
    assert not make_plan(config, tp=8, dtype="bf16", gpu_mem_gib=80).fits
    smallest = smallest_fitting_plan(config, "bf16", 80)
    assert smallest.world_size > 8 and smallest.fits
    assert make_plan(config, tp=8, dtype="fp8", gpu_mem_gib=80).fits


@pytest.mark.slow
def test_plan_command_prints_a_table_and_refuses_what_does_not_fit():
    ok = cli("plan", "--preset", "llama-3-70b", "--tp", "8", "--gpu-mem", "80")
    assert ok.returncode == 0, ok.stderr
    assert "fits: yes" in ok.stdout and "rank  tp  pp  layers" in ok.stdout
    no = cli("plan", "--preset", "llama-3.1-405b", "--tp", "8", "--gpu-mem", "80")
    assert no.returncode == 1
    assert "fits: NO" in no.stdout and "fewest GPUs that fit: tp=" in no.stdout


def test_plan_json_lists_every_rank_and_weight_slice(checkpoints):
    proc = cli("plan", str(checkpoints["gptj"]), "--tp", "2", "--pp", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ranks = data["plan"]["ranks"]
    assert [(r["tp_rank"], r["pp_rank"]) for r in ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    lm_head = next(w for w in ranks[3]["weights"] if w["name"] == "lm_head.weight")
    assert lm_head == {"name": "lm_head.weight", "shape": [256, 64], "parallel": "vocab",
                       "sources": ["lm_head.weight"]}
    assert data["fits"] is True


def test_plan_refusal_is_an_error_message_not_a_traceback(checkpoints):
    proc = cli("plan", str(checkpoints["llama"]), "--tp", "3")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: 4 attention heads do not divide by tp=3"


def test_synth_can_give_a_model_more_positions_than_its_preset(tmp_path):
    """GPT-J 6B has 2,048 positions: a benchmark of 2,048-token prompts needs a checkpoint with
    more, and the planner holds a build to the checkpoint's count."""
    out = cli("synth", "--arch", "gptj", "--preset", "tiny", "--max-positions", "1024", "--out", str(tmp_path / "ck"))
    assert out.returncode == 0, out.stderr
    config = ModelConfig.from_hf(json.loads((tmp_path / "ck" / "config.json").read_text()))
    assert config.max_position_embeddings == 1024
    assert make_plan(config, max_seq_len=1024).max_seq_len == 1024
    with pytest.raises(PlanError, match="max_seq_len 1024 exceeds the model's 512 positions"):
        make_plan(ModelConfig.from_hf(preset_config("tiny", "gptj")), max_seq_len=1024)


def test_qwen3_8b_weights_count_exactly_with_its_per_head_norms():
    """Qwen3-8B has 8,190,735,360 parameters: q_norm and k_norm of head_dim 128 in each of its
    36 layers, an LM head of its own; its 32 heads of 128 are wider than its hidden size."""
    plan = make_plan(_config("qwen3-8b"), dtype="bf16")
    assert plan.ranks[0].memory["weights"] == 2 * 8_190_735_360
    weights = _weights(make_plan(_config("qwen3-32b"), tp=8, dtype="bf16"), 7)
    assert weights["model.layers.0.self_attn.qkv_proj.weight"].shape == [(8 + 2) * 128, 5120]
    assert weights["model.layers.0.self_attn.q_norm.weight"].parallel == "replicated"


def test_qwen2_5_counts_its_qkv_biases_and_one_tied_embedding_and_refuses_14_heads_over_tp4():
    """Qwen2.5-0.5B: 494,032,768 parameters, q, k and v biased (o_proj not), embeddings tied."""
    plan = make_plan(_config("qwen2.5-0.5b"), tp=2, dtype="bf16")
    weights = _weights(plan, 1)
    assert weights["model.layers.0.self_attn.qkv_proj.bias"].shape == [(7 + 1 + 1) * 64]  # 7 q heads, a k, a v
    assert "model.layers.0.self_attn.o_proj.bias" not in weights
    assert make_plan(_config("qwen2.5-0.5b"), dtype="bf16").ranks[0].memory["weights"] == 2 * 494_032_768
    with pytest.raises(PlanError, match="14 attention heads do not divide by tp=4"):
        make_plan(_config("qwen2.5-0.5b"), tp=4)


def test_phi3_ranks_cut_their_slices_from_the_fused_checkpoint_tensors():
    """Phi-3-mini (3,821,079,552 parameters) keeps q, k and v, and gate and up, fused in one
    checkpoint tensor each: every rank's slice is made of that one tensor."""
    assert make_plan(_config("phi-3-mini"), dtype="bf16").ranks[0].memory["weights"] == 2 * 3_821_079_552
    weights = _weights(make_plan(_config("phi-3-mini"), tp=2, dtype="bf16"), 1)
    qkv, gate_up = (weights[f"model.layers.3.{n}.weight"] for n in ("self_attn.qkv_proj", "mlp.gate_up_proj"))
    assert qkv.shape == [3 * 16 * 96, 3072] and qkv.sources == ["model.layers.3.self_attn.qkv_proj.weight"]
    assert gate_up.shape == [8192, 3072] and gate_up.sources == ["model.layers.3.mlp.gate_up_proj.weight"]


def test_plan_command_sizes_qwen3_8b_in_fp8_on_one_80gb_gpu():
    proc = cli("plan", "--preset", "qwen3-8b", "--dtype", "fp8", "--gpu-mem", "80")
    assert proc.returncode == 0, proc.stderr
    assert "model: qwen3-8b (qwen3), 36 layers" in proc.stdout and "fits: yes" in proc.stdout
    assert "model.layers.*.self_attn.q_norm.weight" in proc.stdout
