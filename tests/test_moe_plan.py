"""Planning mixtures of experts: which rank holds which experts (--ep), the exact memory per
rank, whether it fits, and the smallest layout that does, for the public MoE models' shapes."""

from __future__ import annotations

import json

import pytest
from conftest import cli

from dist_runtime.config import ModelConfig
from dist_runtime.errors import PlanError
from dist_runtime.mapping import Mapping
from dist_runtime.plan_report import format_plan
from dist_runtime.presets import preset_config
from sharding.planner import GiB, make_plan, smallest_fitting_plan


def _config(name: str, arch: str | None = None) -> ModelConfig:
    return ModelConfig.from_hf(preset_config(name, arch))


def test_expert_groups_split_the_tp_group_and_each_expert_splits_over_the_rest():
    # TP 4 x EP 2: ranks 0-1 hold experts 0-3, a half of each; ranks 2-3 experts 4-7
    held = [(m.experts(8), m.moe_tp_rank, m.moe_tp) for m in Mapping(tp=4, ep=2).all_ranks()]
    assert held == [(range(0, 4), 0, 2), (range(0, 4), 1, 2), (range(4, 8), 0, 2), (range(4, 8), 1, 2)]
    assert [m.experts(8) for m in Mapping(tp=4, pp=2, ep=4).all_ranks()][4:] == [range(2 * g, 2 * g + 2)
                                                                                 for g in range(4)]
    with pytest.raises(ValueError, match="ep=3 does not divide tp=4"):
        Mapping(tp=4, ep=3)


def test_layouts_the_experts_do_not_divide_into_are_refused_with_the_numbers():
    with pytest.raises(PlanError, match="ep=3 must be at least 1 and divide tp=4"):
        make_plan(_config("tiny", "mixtral"), tp=4, ep=3)
    with pytest.raises(PlanError, match="ep=2: llama has no experts to split"):
        make_plan(_config("tiny", "llama"), tp=2, ep=2)
    with pytest.raises(PlanError, match="8 experts do not divide by ep=16"):
        make_plan(_config("mixtral-8x7b"), tp=16, ep=16)
    with pytest.raises(PlanError, match=r"expert intermediate size 32 does not divide by tp / ep = 64"):
        make_plan(_config("tiny", "mixtral"), tp=64, ep=1)
    with pytest.raises(PlanError, match="int4 engines of mixtures of experts are not built yet"):
        make_plan(_config("tiny", "qwen3_moe"), dtype="int4")


def test_each_rank_holds_its_groups_experts_and_the_weights_are_counted_exactly():
    config = _config("qwen3-30b-a3b")
    one = make_plan(config, dtype="bf16")
    assert one.ranks[0].memory["weights"] == 2 * 30_532_122_624  # Qwen3-30B-A3B: 30.5e9 parameters
    plan = make_plan(config, tp=4, ep=2, dtype="bf16")
    assert [r.experts for r in plan.ranks] == [[0, 64], [0, 64], [64, 128], [64, 128]]
    weights = {w.name: w for w in plan.ranks[3].weights}
    gate_up = weights["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == [64, 2 * 768 // 2, 2048] and gate_up.parallel == "expert-column"
    assert gate_up.sources == ["model.layers.0.mlp.experts.{e}.gate_proj.weight",
                               "model.layers.0.mlp.experts.{e}.up_proj.weight"]
    assert weights["model.layers.0.mlp.experts.down_proj"].shape == [64, 2048, 768 // 2]
    # whole experts over 4 groups hold what halves of twice as many do
    assert make_plan(config, tp=4, ep=4, dtype="bf16").ranks[0].memory["weights"] == plan.ranks[0].memory["weights"]
    # fp8: a byte per GEMM weight (not the LM head's) and a float32 scale per row, per expert too;
    # per rank and layer: q, k, v of 8 + 1 + 1 heads of 128, o_proj, and 32 experts' three matrices
    fp8 = make_plan(config, tp=4, ep=4, dtype="fp8").ranks[0]
    weights = 1280 * 2048 + 2048 * 1024 + 32 * 3 * 768 * 2048
    rows = 1280 + 2048 + 32 * (2 * 768 + 2048)
    assert fp8.memory["weights"] == plan.ranks[0].memory["weights"] - 48 * weights + 48 * 4 * rows


def test_qwen3_235b_fits_eight_80gb_gpus_in_fp8():
    plan = make_plan(_config("qwen3-235b-a22b"), tp=8, ep=8, dtype="fp8", gpu_mem_gib=80)
    assert plan.fits
    assert [r.experts for r in plan.ranks] == [[16 * r, 16 * r + 16] for r in range(8)]
    assert 25 * GiB < plan.largest_rank().memory["weights"] < 30 * GiB  # 235e9 bytes over 8, and scales


def test_qwen3_235b_in_bf16_on_four_gpus_does_not_fit_and_the_smallest_layout_that_does_is_named():
    config = _config("qwen3-235b-a22b")
    plan = make_plan(config, tp=4, ep=4, dtype="bf16", gpu_mem_gib=80)
    assert not plan.fits and plan.largest_rank().memory["weights"] > 100 * GiB
    smallest = smallest_fitting_plan(config, "bf16", 80, ep=4)
    assert smallest.fits and smallest.world_size == 6  # 470 GB of weights: 6 GPUs of 80 GiB, not 5
    assert (smallest.tp, smallest.pp, smallest.ep) == (2, 3, 2)


def test_plan_report_of_a_mixture_that_fits_no_layout_says_so():
    config = _config("qwen3-30b-a3b")
    plan = make_plan(config, tp=2, ep=2, dtype="bf16", gpu_mem_gib=1)
    assert not plan.fits
    report = format_plan(config, plan, None, "qwen3-30b-a3b")
    assert report.splitlines()[-1] == "no layout up to 256 GPUs fits"


@pytest.mark.slow
def test_plan_command_reports_experts_per_rank_and_what_each_node_holds():
    out = cli("plan", "--preset", "mixtral-8x22b", "--dtype", "bf16", "--tp", "8", "--pp", "2", "--ep", "2",
              "--gpu-mem", "80")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "experts: 8 per layer (top 2, renormalised), in ep=2 groups of 4, each split over tp/ep=4 ranks; " \
           "outputs meet by all-reduce" in lines
    rank9 = next(line.split() for line in lines if line.startswith("9 "))
    assert rank9[:6] == ["9", "1", "1", "28-55", "0-3", "(2/4"]
    nodes = [line for line in lines if line.startswith("node ")]
    assert nodes[0].startswith("node 0: ranks 0-7, stage 0 (layers 0-27); experts 0-7, ")
    assert nodes[1].startswith("node 1: ranks 8-15, stage 1 (layers 28-55); experts 0-7, ")
    as_json = json.loads(cli("plan", "--preset", "qwen3-235b-a22b", "--dtype", "bf16", "--tp", "4", "--ep", "4",
                             "--gpu-mem", "80", "--json").stdout)
    assert not as_json["fits"] and as_json["smallest_fitting"] == {"tp": 2, "pp": 3, "ep": 2}
    assert as_json["plan"]["ep"] == 4 and as_json["plan"]["ranks"][1]["experts"] == [32, 64]
