"""Quantized engines: int8 weight-only runs anywhere and stays close to float32; fp8 runs on
GPUs of compute capability 8.9+ and is refused elsewhere with a clear message; rank files
hold the quantized weights with their scales, and the planner sizes them. An fp8 KV cache runs
on the CPU reference too, stays close to the engine's own-dtype cache, and halves a block."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CALIB_TEXT, SMALL_PLAN, cli, json_lines
from safetensors import safe_open

from dist_runtime.accuracy import compare
from dist_runtime.config import ModelConfig
from dist_runtime.engine import Engine
from dist_runtime.layers.quantized import cpu_runs_fp8_gemms, fp8_linear_reference, quantize_input, quantized_linear
from dist_runtime.llm import LLM
from dist_runtime.presets import preset_config
from dist_runtime.quantization import FP8_MAX, QUANTIZED_DTYPES, dequantize_weight, quantize_weight
from sharding.builder import build_engine
from sharding.planner import make_plan

ROOM = dict(max_seq_len=256)  # 16-token prompts + 125 positions each
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="fp8 needs a CUDA GPU of compute capability 8.9+")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gptj"])
def test_int8wo_engine_on_cpu_ranks_stays_close_to_fp32(engines, name):
    reference = engines(name, 1, 1, "fp32", **ROOM)
    report = compare(str(reference), str(engines(name, 2, 2, "int8wo", **ROOM)))
    assert report["positions"] == 1000
    assert report["logit_cosine_mean"] > 0.999 and report["top1_agreement"] > 0.93, report
    assert report["greedy_agreement_mean"] >= 16, report


def test_rank_files_hold_int8_weights_with_a_scale_per_output_row(engines):
    engine = Engine.load(engines("llama", 2, 1, "int8wo"))
    with safe_open(str(engine.rank_path(1)), framework="pt") as f:
        qkv = f.get_tensor("model.layers.0.self_attn.qkv_proj.weight")
        scale = f.get_tensor("model.layers.0.self_attn.qkv_proj.weight_scale")
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert qkv.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (qkv.shape[0],)
    assert norm.dtype == torch.bfloat16  # only GEMM weights are quantized


def test_planner_sizes_quantized_weights_as_written(engines):
    engine = Engine.load(engines("llama", 2, 2, "int8wo"))
    for rank in engine.plan.ranks:
        written = engine.files[engine.rank_path(rank.rank).name]["bytes"]
        assert abs(rank.memory["weights"] - written) / written < 0.05
    config = ModelConfig.from_hf(preset_config("llama-3-8b"))
    bf16, int8 = (make_plan(config, 1, 1, d).ranks[0].memory["weights"] for d in ("bf16", "int8wo"))
    assert 0.5 < int8 / bf16 < 0.6  # GEMM weights halve; embeddings and norms stay bf16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's fp8 path, on a machine without a GPU")
def test_an_fp8_engine_runs_on_a_cpu_whose_torch_has_fp8_gemms_and_is_refused_elsewhere(engines):
    args = ["--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--json", "--prompt", "Hello, world!"]
    run = cli("generate", str(engines("llama", 1, 1, "fp8")), *args)
    if not cpu_runs_fp8_gemms():
        assert run.returncode == 1 and "compute capability 8.9" in run.stderr and "int8wo" in run.stderr
        return
    [fp8] = json_lines(run)
    [bf16] = json_lines(cli("generate", str(engines("llama", 1, 1, "bf16")), *args))
    assert fp8["token_ids"] == bf16["token_ids"]  # random weights: greedy picks far from ties


@pytest.mark.parametrize("fmt", [pytest.param("int8wo", marks=GPU), pytest.param("fp8", marks=FP8_GPU)])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_quantized_gemm_matches_its_dequantized_reference(fmt, rows):
    torch.manual_seed(0)
    w = torch.randn(384, 256, device="cuda")
    q, scale = quantize_weight(w, fmt)
    assert q.dtype == QUANTIZED_DTYPES[fmt]
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ dequantize_weight(q, scale).t()
    # fp8 rounds the activations to E4M3 too: 2^-4 relative per element, averaging out over 256 terms
    tol = 4e-2 if fmt == "fp8" else 2e-2
    assert (quantized_linear(x, q, scale, None).float() - ref).abs().max() / ref.abs().max() < tol


def test_a_static_input_scale_is_as_close_as_per_token_scaling_and_saturates_past_its_range():
    """fp8_linear's math, in its float32 emulation: with the per-tensor scale
    calibrated on these activations, every row (ranges 100x apart) stays as close to the float
    GEMM as with per-token scales; with a scale calibrated on smaller ones, the excess saturates."""
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(96, 64), "fp8")
    x = torch.randn(7, 64) * torch.logspace(-1, 1, 7)[:, None]
    exact = x @ dequantize_weight(q, scale).t()
    static = x.abs().max().view(1) / FP8_MAX
    for input_scale in (None, static):
        err = (fp8_linear_reference(x, q, scale, input_scale) - exact).norm(dim=1) / exact.norm(dim=1)
        assert (err < 4e-2).all(), err  # measured: 2.6% overall, the activations' E4M3 rounding
    xq, x_scale = quantize_input(x, static / 4)
    assert x_scale.shape == (7, 1) and (x_scale == static / 4).all()
    beyond = x.abs() > static / 4 * FP8_MAX
    assert beyond.any() and (xq.float().abs()[beyond] == FP8_MAX).all()


# torch 2.13's CPU build runs fp8 _scaled_mm with per-row scales; 2.11's (the GPU machine's) only per tensor
CPU_FP8 = pytest.mark.skipif(not cpu_runs_fp8_gemms(), reason="this torch build has no fp8 _scaled_mm on the CPU")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=CPU_FP8), pytest.param("cuda", marks=FP8_GPU)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("rows,bias", [(1, False), (7, True), (300, False), (300, True)])
@pytest.mark.parametrize("fast", [False, True])
def test_fp8_gemm_matches_its_float32_emulation(rows, bias, static, device, fast):
    """torch's CPU build runs _scaled_mm too (fp8 engines run there, slowly), which checks the
    call itself where no GPU is. A bias goes into the
    GEMM (_scaled_mm adds it before its one rounding to bf16). Fast accumulation (which the
    tuning may pick) stays within the same bound."""
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(384, 256, device=device), "fp8")
    x = torch.randn(rows, 256, device=device, dtype=torch.bfloat16)
    b = torch.randn(384, device=device, dtype=torch.bfloat16) * 10 if bias else None
    input_scale = x.float().abs().max().view(1) / FP8_MAX if static else None
    ref = fp8_linear_reference(x.float(), q, scale, input_scale) + (b.float() if bias else 0)
    # the same E4M3 operands and scales: only the summation order and the bf16 output differ
    got = quantized_linear(x, q, scale, b, input_scale, fast_accumulate=fast).float()
    assert (got - ref).abs().max() / ref.abs().max() < 1e-2


def assert_quantized_alike(got, unfused: torch.Tensor, input_scale: torch.Tensor | None) -> None:
    """`got` (Fp8Rows from a fused kernel) holds what quantize_input makes of the unfused
    result, but where the two roundings of that result (exp, rsqrt) differ by an ulp."""
    values, scale = quantize_input(unfused, input_scale)
    assert got.values.dtype == torch.float8_e4m3fn and got.dtype == unfused.dtype
    assert torch.allclose(got.scale, scale, rtol=1e-2)
    same = (got.values.float() == values.float()).float().mean().item()
    assert same > 0.99, f"only {same:.1%} of the E4M3 values agree"


@FP8_GPU
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("rows,size", [(1, 64), (7, 4096), (33, 5000), (3, 14336), (2, 20000)])
def test_fused_fp8_input_quantization_matches_quantize_input(rows, size, static):
    """RMSNorm, LayerNorm, SiLU-and-mul and GELU quantize the next GEMM's input in their own kernel, and the
    GEMM's own pass is one kernel: all give what quantize_input gives on the unfused result,
    the plain pass bit for bit (E4M3 rounding ties included)."""
    from dist_runtime.kernels.fused import add_rmsnorm, fp8_rows, layernorm
    from dist_runtime.layers.norm import LayerNorm, RMSNorm

    input_scale = torch.tensor([0.01], device="cuda") if static else None
    norm = RMSNorm(size, 1e-5).cuda().bfloat16()
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x, residual = (torch.randn(rows, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    unfused, summed = norm.reference(x, residual.clone())
    got = add_rmsnorm(x, norm.weight, 1e-5, residual, fp8=True, input_scale=input_scale)
    assert torch.equal(residual, summed)
    assert_quantized_alike(got, unfused, input_scale)
    gate_up = torch.randn(rows, 2 * size, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_quantized_alike(fp8_rows(gate_up, input_scale, act="silu_mul"), F.silu(gate) * up, input_scale)
    assert_quantized_alike(fp8_rows(x, input_scale, act="gelu_tanh"), F.gelu(x, approximate="tanh"), input_scale)
    layer_norm = LayerNorm(size, 1e-5).cuda().bfloat16()
    torch.nn.init.normal_(layer_norm.weight, 1.0, 0.1)
    torch.nn.init.normal_(layer_norm.bias, 0.0, 0.1)
    assert_quantized_alike(layernorm(x, layer_norm.weight, layer_norm.bias, 1e-5, fp8=True, input_scale=input_scale),
                           layer_norm.reference(x), input_scale)
    plain, (values, scale) = fp8_rows(x, input_scale), quantize_input(x, input_scale)
    assert torch.equal(plain.values.float(), values.float()) and torch.equal(plain.scale, scale)


@FP8_GPU
@pytest.mark.parametrize("name", ["llama", "gptj"])
def test_fp8_engine_on_the_gpu_stays_close_to_bf16(engines, name):
    """GPT-J's fp8 path fuses differently (LayerNorm and GELU quantize, biases go into _scaled_mm)."""
    report = compare(str(engines(name, 1, 1, "bf16", **ROOM)), str(engines(name, 1, 1, "fp8", **ROOM)),
                     device="cuda")
    assert report["logit_cosine_mean"] > 0.99 and report["top1_agreement"] > 0.8, report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gptj"])
def test_fp8_kv_cache_stays_close_to_the_same_engine_with_its_own_cache(engines, name):
    """Measured: cosine 0.99976 / 0.99990, top-1 0.964 / 0.978 (llama / gptj, default scale 1)."""
    report = compare(str(engines(name, 1, 1, "fp32", **ROOM)),
                     str(engines(name, 1, 1, "fp32", kv_cache_dtype="fp8", **ROOM)))
    assert report["logit_cosine_mean"] > 0.999 and report["top1_agreement"] > 0.93, report


def test_fp8_kv_cache_blocks_take_half_the_bytes_of_bf16(engines):
    """The planner's estimate, the runner's block size (which divides a GPU's free memory into
    blocks) and the cache it allocates all halve."""
    kv_bytes = {}
    for kv in ("auto", "fp8"):
        engine = engines("llama", 1, 1, "bf16", kv_cache_dtype=kv)
        with LLM(str(engine)) as llm:
            runner = llm.coordinator.runner
            caches = [c for a in runner.model.attention_layers() for c in (a.k_cache, a.v_cache)]
            assert {c.dtype for c in caches} == {torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16}
            allocated = sum(c.nbytes for c in caches)
            assert allocated == runner._block_bytes() * (runner.num_blocks + 1)  # + the spare block
        kv_bytes[kv] = (Engine.load(engine).plan.ranks[0].memory["kv_cache"], allocated)
    assert kv_bytes["auto"] == (2 * kv_bytes["fp8"][0], 2 * kv_bytes["fp8"][1])


@FP8_GPU
def test_fp8_kv_cache_engine_on_the_gpu_stays_close_to_bf16_and_holds_twice_the_blocks(engines):
    bf16, fp8_kv = (str(engines("llama", 1, 1, "bf16", kv_cache_dtype=kv, **ROOM)) for kv in ("auto", "fp8"))
    report = compare(bf16, fp8_kv, device="cuda")
    assert report["logit_cosine_mean"] > 0.995 and report["top1_agreement"] > 0.9, report
    blocks = []
    for engine in (bf16, fp8_kv):
        proc = cli("bench", engine, "--device", "cuda", "--kv-cache-fraction", "0.2", "--isl", "16", "--osl", "4",
                   "--num-requests", "4", "--json")
        assert proc.returncode == 0, proc.stderr
        blocks.append(json.loads(proc.stdout)["kv_cache"]["blocks"])
    assert 1.9 < blocks[1] / blocks[0] < 2.1, blocks


@FP8_GPU
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_calibrated_fp8_engine_on_the_gpu_stays_close_to_bf16(engines, checkpoints, tmp_path, kv):
    """Static per-tensor input scales (and, with an fp8 KV cache, its calibrated scales)."""
    engine = build_engine(checkpoints["llama"], tmp_path / "fp8-calib", 1, 1, "fp8", progress=False, calib=CALIB_TEXT,
                          kv_cache_dtype=kv, **SMALL_PLAN | ROOM)
    report = compare(str(engines("llama", 1, 1, "bf16", **ROOM)), str(engine.path), device="cuda")
    assert report["logit_cosine_mean"] > 0.99 and report["top1_agreement"] > 0.8, report
