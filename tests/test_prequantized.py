"""Pre-quantized checkpoints, written here from a random float Llama in each layout by plain
code that follows the format's own description (not the loader's), beside the float weights
they dequantize to. Engines built from them give Hugging Face's tokens on those float weights;
an fp8 engine keeps the stored E4M3 bytes and scales, an int4 one the stored nibbles; and any
other quantization is refused by name before anything is built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, SMALL_PLAN, assert_equal_to_transformers, cli, generate_in_process, transformers_greedy
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_runtime.accuracy import compare
from dist_runtime.errors import CheckpointError, PlanError
from dist_runtime.int4 import unpack_int4
from dist_runtime.layers.quantized import cpu_runs_fp8_gemms
from dist_runtime.llm import LLM
from dist_runtime.presets import preset_config
from dist_runtime.quantization import g_idx_name
from dist_runtime.sampling_params import SamplingParams
from sharding.builder import build_engine
from sharding.checkpoint import Checkpoint
from sharding.planner import make_plan
from sharding.synth import write_checkpoint

E4M3 = torch.float8_e4m3fn
MAX_TOKENS = 12
GROUP = 128
# A Llama whose every GEMM input (256, 512, and 128 per rank at tp=2) holds whole groups of 128
CONFIG = preset_config("tiny", "llama") | {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEPT_FLOAT = "model.layers.1.mlp.down_proj"  # left in float by the FP8 checkpoints' ignore lists
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8_DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(not cpu_runs_fp8_gemms(), reason="no CPU fp8 GEMMs")),
               pytest.param("cuda", marks=pytest.mark.skipif(
                   not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                   reason="fp8 GEMMs need compute capability 8.9+"))]


def _linears(tensors: dict) -> list[str]:
    return [n.removesuffix(".weight") for n in tensors if n.endswith(".weight") and n.split(".")[-2] in LINEAR]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (held in int64) as the int32 a checkpoint stores."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_rows(values: torch.Tensor, order=range(8)) -> torch.Tensor:
    """[n, 8m] 0..15 -> int32 [n, m]: word c's nibble j holds column 8c + order[j]."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for c in range(words.shape[1]):
        for j, column in enumerate(order):
            words[:, c] |= values[:, 8 * c + column].long() << (4 * j)
    return _to_int32(words)


# ---- each format, quantized as its description says: (stored tensors, dequantized weights) ----

def _fp8_channel(w: torch.Tensor, name: str) -> tuple[dict, torch.Tensor]:
    """compressed-tensors, strategy channel: scale [out, 1] in the model's bf16, no input scale."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 448).to(torch.bfloat16)
    q = (w / scale.float()).clamp(-448, 448).to(E4M3)
    return {f"{name}.weight": q, f"{name}.weight_scale": scale}, q.float() * scale.float()


def _fp8_tensor_static(w: torch.Tensor, name: str, shape=(1,)) -> tuple[dict, torch.Tensor]:
    """Per-tensor weight scale and a calibrated input scale (each layer its own, q, k and v too)."""
    scale = (w.abs().amax() / 448).reshape(shape)
    q = (w / scale).clamp(-448, 448).to(E4M3)
    input_scale = torch.full(shape, 0.02 * (1 + LINEAR.index(name.split(".")[-1])))  # 9 to 63 reach 448
    return {f"{name}.weight": q, f"{name}.weight_scale": scale, f"{name}.input_scale": input_scale}, q.float() * scale


def _fp8_block(w: torch.Tensor, name: str) -> tuple[dict, torch.Tensor]:
    """weight_block_size [128, 128]: weight_scale_inv [ceil(out/128), ceil(in/128)], which multiplies."""
    out, inp = w.shape
    scale = torch.ones(-(-out // 128), -(-inp // 128))
    deq, q = torch.empty_like(w), torch.empty(w.shape, dtype=E4M3)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            scale[i, j] = w[rows, cols].abs().max() / 448
            q[rows, cols] = (w[rows, cols] / scale[i, j]).clamp(-448, 448).to(E4M3)
            deq[rows, cols] = q[rows, cols].float() * scale[i, j]
    return {f"{name}.weight": q, f"{name}.weight_scale_inv": scale}, deq


def _asymmetric(w: torch.Tensor, zero_from: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns w [out, g] of one group: (q, float16 scale [out], zero [out]): the range over 15 steps."""
    low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale = ((high - low) / 15).half()
    zero = torch.round(-low / scale.float()).clamp(zero_from, 15)
    return torch.round(w / scale.float()[:, None] + zero[:, None]).clamp(0, 15), scale, zero


def _empty_groups(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [out, in], float16 scales and zero points [groups, out]."""
    return torch.empty(out, inp), torch.empty(inp // GROUP, out, dtype=torch.half), torch.empty(inp // GROUP, out)


def _awq(w: torch.Tensor, name: str) -> tuple[dict, torch.Tensor]:
    """AWQ gemm: qweight [in, out/8] and qzeros [in/128, out/8] in AWQ's nibble order, scales [in/128, out]."""
    out, inp = w.shape
    q, scales, zeros = _empty_groups(out, inp)
    for g in range(inp // GROUP):
        cols = slice(g * GROUP, (g + 1) * GROUP)
        q[:, cols], scales[g], zeros[g] = _asymmetric(w[:, cols])
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    deq = (q - zeros.t().repeat_interleave(GROUP, 1)) * scales.t().float().repeat_interleave(GROUP, 1)
    return {f"{name}.qweight": _pack_rows(q.t(), order), f"{name}.qzeros": _pack_rows(zeros, order),
            f"{name}.scales": scales}, deq


def _gptq(w: torch.Tensor, name: str, act_order: bool, sym: bool, v1: bool, seed: int) -> tuple[dict, torch.Tensor]:
    """GPTQ: qweight [in/8, out] packing 8 inputs a word, qzeros [groups, out/8] 8 outputs a word
    (zero - 1 in format gptq), scales [groups, out], g_idx [in]; with act-order the groups are
    runs of a random order of the columns."""
    out, inp = w.shape
    order = torch.randperm(inp, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(inp)
    g_idx = torch.empty(inp, dtype=torch.int32)
    g_idx[order] = (torch.arange(inp) // GROUP).to(torch.int32)
    q, scales, zeros = _empty_groups(out, inp)
    for g in range(inp // GROUP):
        cols = order[g * GROUP:(g + 1) * GROUP]
        if sym:  # a step of 2 max|w| / 15 about the zero point 8
            scales[g] = (w[:, cols].abs().amax(dim=1) * 2 / 15).half()
            zeros[g] = 8
            q[:, cols] = torch.round(w[:, cols] / scales[g].float()[:, None] + 8).clamp(0, 15)
        else:  # format gptq cannot store a zero point of 0
            q[:, cols], scales[g], zeros[g] = _asymmetric(w[:, cols], zero_from=1 if v1 else 0)
    deq = (q - zeros.t()[:, g_idx.long()]) * scales.t().float()[:, g_idx.long()]
    words = torch.zeros(inp // 8, out, dtype=torch.int64)
    for j in range(8):
        words |= q.t()[j::8].long() << (4 * j)
    return {f"{name}.qweight": _to_int32(words), f"{name}.qzeros": _pack_rows(zeros - 1 if v1 else zeros),
            f"{name}.scales": scales, f"{name}.g_idx": g_idx}, deq


CT_DYNAMIC = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
CT_STATIC = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def _compressed_tensors(strategy: str, inputs: dict) -> dict:
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": inputs, "weights": {
                "num_bits": 8, "type": "float", "strategy": strategy, "dynamic": False, "symmetric": True}}},
            "ignore": ["lm_head", KEPT_FLOAT], "kv_cache_scheme": None}


def _gptq_config(act_order: bool, sym: bool, v1: bool) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": sym,
            "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq" if v1 else "gptq_v2"}


# name: (quantize one linear layer, config.json's quantization_config, whether the float one is kept)
FORMATS = {
    "ct-channel": (_fp8_channel, _compressed_tensors("channel", CT_DYNAMIC), True),
    "ct-tensor-static": (_fp8_tensor_static, _compressed_tensors("tensor", CT_STATIC), True),
    "modelopt": (lambda w, n: _fp8_tensor_static(w, n, shape=()), None, False),
    "fp8-block": (_fp8_block, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                               "weight_block_size": [128, 128]}, False),
    "awq": (_awq, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                   "modules_to_not_convert": None}, False),
    "gptq-sym": (lambda w, n: _gptq(w, n, False, True, True, 0), _gptq_config(False, True, True), False),
    "gptq-act-order": (lambda w, n: _gptq(w, n, True, False, True, 1), _gptq_config(True, False, True), False),
    "gptq-v2-act-order-sym": (lambda w, n: _gptq(w, n, True, True, False, 2), _gptq_config(True, True, False), False),
}
MODELOPT = {"producer": {"name": "modelopt", "version": "0.19.0"},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}


def _write(base: Path, out: Path, tensors: dict, quantization: dict | None) -> Path:
    out.mkdir(parents=True)
    for file in base.iterdir():
        if not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
            shutil.copy(file, out / file.name)
    if quantization is not None:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(config | {"quantization_config": quantization}))
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return write_checkpoint(CONFIG, tmp_path_factory.mktemp("base") / "llama", seed=11, progress=False)


@pytest.fixture(scope="session")
def quantized(base, checkpoints, tmp_path_factory):
    """quantized(format) -> (pre-quantized checkpoint, the float checkpoint it dequantizes to).
    fp8-block is cut from conftest's tiny Llama, whose sizes (64, 160) leave partial blocks."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(fmt: str) -> tuple[Path, Path]:
        if fmt not in made:
            source = checkpoints["llama"] if fmt == "fp8-block" else base
            floats = {}
            for file in sorted(source.glob("*.safetensors")):
                floats |= load_file(file)
            quantize, config, keep_float = FORMATS[fmt]
            stored, dequantized = dict(floats), dict(floats)
            for name in _linears(floats):
                if keep_float and name == KEPT_FLOAT:
                    continue
                del stored[f"{name}.weight"]
                tensors, dequantized[f"{name}.weight"] = quantize(floats[f"{name}.weight"], name)
                stored |= tensors
            root = tmp_path_factory.mktemp(fmt)
            prequantized = _write(source, root / "quantized", stored, config)
            if fmt == "modelopt":
                (prequantized / "hf_quant_config.json").write_text(json.dumps(MODELOPT))
            made[fmt] = prequantized, _write(source, root / "dequantized", dequantized, None)
        return made[fmt]

    return get


@pytest.fixture(scope="session")
def transformers_run():
    """transformers_run(checkpoint): conftest.transformers_greedy of a float checkpoint, once."""
    runs = {}

    def get(checkpoint: Path):
        if checkpoint not in runs:
            runs[checkpoint] = transformers_greedy(checkpoint)
        return runs[checkpoint]

    return get


def _assert_transformers_tokens(engine: Path, reference: list) -> None:
    with LLM(engine) as llm:
        assert_equal_to_transformers(*generate_in_process(llm), reference)


def _build(checkpoint: Path, out: Path, dtype: str, tp: int = 1) -> Path:
    build_engine(checkpoint, out, tp, 1, dtype, progress=False, **SMALL_PLAN)
    return out


# ---- reading ----

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_weight_reads_as_the_formats_own_dequantization(fmt, quantized):
    prequantized, dequantized = quantized(fmt)
    ck = Checkpoint(prequantized)
    expected = load_file(dequantized / "model.safetensors")
    assert ck.names() >= set(expected)
    for name, tensor in expected.items():
        assert ck.shape(name) == tuple(tensor.shape), name
        assert ck.get(name).float().equal(tensor.float()), name


@pytest.mark.parametrize("fmt,tp", [
    pytest.param("ct-channel", 2, marks=pytest.mark.slow), ("modelopt", 1), ("fp8-block", 1),
    pytest.param("awq", 2, marks=pytest.mark.slow), ("gptq-act-order", 1)])
def test_float32_engine_equals_transformers_on_the_dequantized_weights(fmt, tp, quantized, transformers_run, tmp_path):
    prequantized, dequantized = quantized(fmt)
    _assert_transformers_tokens(_build(prequantized, tmp_path / "eng", "fp32", tp), transformers_run(dequantized))


# ---- fp8 engines keep what is stored ----

def _rank_tensors(engine: Path, rank: int) -> dict[str, torch.Tensor]:
    with safe_open(str(engine / f"rank-{rank:05d}.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_fp8_engine_holds_the_stored_e4m3_bytes_and_channel_scales(quantized, tmp_path):
    prequantized, _ = quantized("ct-channel")
    stored = load_file(prequantized / "model.safetensors")
    engine = _build(prequantized, tmp_path / "eng", "fp8", tp=2)
    for rank in range(2):
        held = _rank_tensors(engine, rank)
        qkv = "model.layers.0.self_attn.qkv_proj"
        q, k, v = (stored[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
        q_scale, k_scale, v_scale = (stored[f"model.layers.0.self_attn.{p}_proj.weight_scale"].float()[:, 0]
                                     for p in "qkv")
        rows_q, rows_kv = slice(128 * rank, 128 * (rank + 1)), slice(64 * rank, 64 * (rank + 1))
        expected = torch.cat([q[rows_q], k[rows_kv], v[rows_kv]])
        assert held[f"{qkv}.weight"].view(torch.uint8).equal(expected.view(torch.uint8))
        assert held[f"{qkv}.weight_scale"].equal(torch.cat([q_scale[rows_q], k_scale[rows_kv], v_scale[rows_kv]]))
        down = "model.layers.0.mlp.down_proj"  # row-parallel: every output row, half the input columns
        assert held[f"{down}.weight"].view(torch.uint8).equal(
            stored[f"{down}.weight"][:, 256 * rank: 256 * (rank + 1)].view(torch.uint8))
        assert held[f"{down}.weight_scale"].equal(stored[f"{down}.weight_scale"].float()[:, 0])
        assert not any(name.endswith("input_scale") for name in held)  # dynamic: scaled per token
        kept = held[f"{KEPT_FLOAT}.weight"].float() * held[f"{KEPT_FLOAT}.weight_scale"][:, None]
        float_slice = stored[f"{KEPT_FLOAT}.weight"][:, 256 * rank: 256 * (rank + 1)]
        assert (kept - float_slice).abs().max() <= float_slice.abs().amax(dim=1).max() / 16  # rounded here


def test_fp8_engine_takes_stored_input_scales_and_per_tensor_scales_become_rows(quantized, tmp_path):
    prequantized, _ = quantized("ct-tensor-static")
    stored = load_file(prequantized / "model.safetensors")
    held = _rank_tensors(_build(prequantized, tmp_path / "eng", "fp8"), 0)
    layer = "model.layers.0.self_attn"
    scales = [stored[f"{layer}.{p}_proj.weight_scale"] for p in "qkv"]
    rows = torch.cat([s.expand(n) for s, n in zip(scales, (256, 128, 128))])
    assert held[f"{layer}.qkv_proj.weight_scale"].equal(rows)
    # q, k and v read one input: the largest of their scales, so none saturates sooner than stored
    assert held[f"{layer}.qkv_proj.input_scale"].equal(torch.stack([stored[f"{layer}.{p}_proj.input_scale"]
                                                                    for p in "qkv"]).amax(dim=0))
    assert held[f"{layer}.o_proj.input_scale"].equal(stored[f"{layer}.o_proj.input_scale"])
    assert f"{KEPT_FLOAT}.input_scale" not in held  # kept in float by the checkpoint: no calibrated scale


def test_block_scaled_fp8_is_requantized_per_row_within_e4m3_rounding(quantized, tmp_path):
    """Our fp8 GEMM scales per output row, so block-wise weights are rounded again per row:
    each weight moves by at most half an E4M3 step of its row (2^-4 of the row's largest)."""
    prequantized, dequantized = quantized("fp8-block")
    floats = {}
    for file in dequantized.glob("*.safetensors"):
        floats |= load_file(file)
    held = _rank_tensors(_build(prequantized, tmp_path / "eng", "fp8"), 0)
    gate_up = torch.cat([floats[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    name = "model.layers.0.mlp.gate_up_proj"
    got = held[f"{name}.weight"].float() * held[f"{name}.weight_scale"][:, None]
    error = (got - gate_up).abs() / gate_up.abs().amax(dim=1, keepdim=True)
    assert error.max() <= 2**-4 and error.mean() < 2**-7


# ---- int4 engines keep what is stored ----

@pytest.mark.parametrize("fmt", ["awq", "gptq-sym", "gptq-act-order", "gptq-v2-act-order-sym"])
def test_int4_engine_equals_transformers_on_the_dequantized_weights(fmt, quantized, transformers_run, tmp_path):
    prequantized, dequantized = quantized(fmt)
    _assert_transformers_tokens(_build(prequantized, tmp_path / "eng", "int4-fp32"), transformers_run(dequantized))


@pytest.mark.slow
def test_int4_act_order_engine_at_tp2_equals_transformers(quantized, transformers_run, tmp_path):
    """Row-parallel ranks under act-order hold half the columns and every group's tables."""
    prequantized, dequantized = quantized("gptq-act-order")
    engine = _build(prequantized, tmp_path / "eng", "int4-fp32", tp=2)
    held = _rank_tensors(engine, 1)
    down = "model.layers.0.mlp.down_proj"
    assert held[f"{down}.weight"].shape == (256, 256 // 8) and held[f"{down}.weight_scale"].shape == (256, 4)
    assert held[f"{down}.g_idx"].equal(load_file(prequantized / "model.safetensors")[f"{down}.g_idx"][256:])
    _assert_transformers_tokens(engine, transformers_run(dequantized))


def test_int4_engine_holds_the_stored_nibbles_scales_and_zero_points(quantized, tmp_path):
    prequantized, dequantized = quantized("awq")
    held = _rank_tensors(_build(prequantized, tmp_path / "eng", "int4"), 0)
    floats = load_file(dequantized / "model.safetensors")
    stored = load_file(prequantized / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    q, scale, zero = unpack_int4(held[f"{name}.weight"]), held[f"{name}.weight_scale"], held[f"{name}.weight_zero"]
    assert scale.dtype == torch.float32 and scale.equal(stored[f"{name}.scales"].float().t())  # bf16 engine: exact fp32
    deq = (q.float() - zero.repeat_interleave(GROUP, 1)) * scale.repeat_interleave(GROUP, 1)
    assert deq.equal(floats[f"{name}.weight"])
    assert g_idx_name(f"{name}.weight") not in held  # groups in column order need none


def test_int4_engine_rounds_a_float_checkpoint_to_nearest(base, tmp_path):
    held = _rank_tensors(_build(base, tmp_path / "eng", "int4-fp32"), 0)
    w = load_file(base / "model.safetensors")["model.layers.0.self_attn.o_proj.weight"]
    name = "model.layers.0.self_attn.o_proj"
    scale, zero = (held[f"{name}.weight_{t}"].repeat_interleave(GROUP, 1) for t in ("scale", "zero"))
    deq = (unpack_int4(held[f"{name}.weight"]).float() - zero) * scale
    assert ((deq - w).abs() <= scale / 2 + 1e-6).all()


def test_planner_counts_int4_weights_as_written(quantized, tmp_path):
    for fmt in ("awq", "gptq-act-order"):
        prequantized, _ = quantized(fmt)
        engine = _build(prequantized, tmp_path / fmt, "int4", tp=2)
        plan = json.loads((engine / "engine.json").read_text())["plan"]
        for rank in plan["ranks"]:
            written = (engine / f"rank-{rank['rank']:05d}.safetensors").stat().st_size
            assert abs(rank["memory"]["weights"] - written) / written < 0.02, (fmt, rank["rank"])


def test_int4_groups_that_a_rank_would_split_are_refused_with_the_sizes(quantized):
    ck = Checkpoint(quantized("awq")[0])
    with pytest.raises(PlanError, match=r"o_proj: its 256 input columns over tp=4 give each rank 64, not a whole "
                                        r"number of the checkpoint's int4 groups of 128"):
        make_plan(ck.config, 4, 1, "int4", **ck.scheme.plan_options())


# ---- refusal ----

@pytest.mark.parametrize("quantization,named", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "hqq", "nbits": 4}, "quant_method 'hqq'"),
    ({**_compressed_tensors("channel", CT_DYNAMIC), "format": "pack-quantized"}, "format 'pack-quantized'"),
    ({**_gptq_config(False, True, True), "bits": 8}, "8-bit weights"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'"),
])
def test_an_unread_quantization_is_refused_by_name_before_anything_is_built(quantization, named, base, tmp_path):
    checkpoint = _write(base, tmp_path / "ckpt", load_file(base / "model.safetensors"), quantization)
    with pytest.raises(CheckpointError, match=named + ".*this runtime reads compressed-tensors") as refused:
        build_engine(checkpoint, tmp_path / "eng", dtype="fp32", progress=False)
    assert quantization["quant_method"] in str(refused.value)
    assert not (tmp_path / "eng").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["build", "plan"])
def test_cli_refuses_an_unread_quantization_with_one_error_line(command, base, tmp_path):
    checkpoint = _write(base, tmp_path / "ckpt", load_file(base / "model.safetensors"),
                        {"quant_method": "bitsandbytes", "load_in_4bit": True})
    run = cli(command, str(checkpoint), *(["--out", str(tmp_path / "eng")] if command == "build" else []))
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("error: ") and "'bitsandbytes'" in run.stderr
    assert not (tmp_path / "eng").exists()


# ---- running them: fp8 and int4 on the CPU and the GPU, against the float32 reference ----

def _assert_follows(engine: Path, reference: Path, device: str, tolerance: float) -> None:
    """`engine` on `device` against the float32 `reference` on the CPU: the first logits within
    `tolerance` (relative norm), the greedy tokens equal up to a near tie, where each side's
    token is among the other's top 5."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    with LLM(reference) as cpu:
        expected = cpu.generate(PROMPTS, params, return_logits=True)
    with LLM(engine, device=device) as llm:
        got = llm.generate(PROMPTS, params, return_logits=True)
    for ours, ref in zip(got, expected):
        a, b = ours.outputs[0].logits[0].float().cpu(), ref.outputs[0].logits[0].float()
        assert ((a - b).norm() / b.norm()).item() < tolerance
        for step, (x, y) in enumerate(zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs)):
            if x.token_id != y.token_id:
                assert x.token_id in [t for t, _ in y.top] and y.token_id in [t for t, _ in x.top], (step, x, y)
                break


@pytest.mark.parametrize("device", FP8_DEVICES)
@pytest.mark.parametrize("fmt", ["ct-channel", "ct-tensor-static"])
def test_fp8_engine_from_compressed_tensors_follows_the_float32_reference(fmt, device, quantized, tmp_path):
    """The stored E4M3 weights (and input scales) in _scaled_mm, on the CPU where torch runs it and
    on the GPU, against the float32 engine of the same checkpoint: within 10% (activations in E4M3 too)."""
    prequantized, _ = quantized(fmt)
    _assert_follows(_build(prequantized, tmp_path / "fp8", "fp8"), _build(prequantized, tmp_path / "fp32", "fp32"),
                    device, 0.1)


@GPU
@pytest.mark.parametrize("fmt", ["awq", "gptq-act-order"])
def test_gpu_int4_engines_follow_the_cpu_reference(fmt, quantized, tmp_path):
    """The W4A16 kernel: with float32 activations the CPU's tokens (products exact, sums float32);
    with bf16 ones within 3% of them, equal up to a near tie."""
    prequantized, _ = quantized(fmt)
    reference = _build(prequantized, tmp_path / "int4-fp32", "int4-fp32")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(reference) as cpu:
        expected = [o.token_ids for o in cpu.generate(PROMPTS, params)]
    with LLM(reference, device="cuda") as gpu:
        assert [o.token_ids for o in gpu.generate(PROMPTS, params)] == expected
    _assert_follows(_build(prequantized, tmp_path / "int4", "int4"), reference, "cuda", 3e-2)


@pytest.mark.slow
def test_accuracy_compares_an_int4_engine_with_a_bf16_one(quantized, base, tmp_path):
    """From one AWQ checkpoint, the CPU's int4 engine dequantizes to the very bf16 weights of the
    bf16 engine: the same logits. Rounded here from float weights, int4 strays, measurably."""
    prequantized, _ = quantized("awq")
    same = compare(str(_build(prequantized, tmp_path / "bf16", "bf16")), str(_build(prequantized, tmp_path / "int4",
                                                                                      "int4")), prompts=2, steps=4)
    assert same["logit_cosine_min"] > 0.9999 and same["top1_agreement"] == 1.0, same
    rounded = compare(str(_build(base, tmp_path / "base-bf16", "bf16")),
                      str(_build(base, tmp_path / "base-int4", "int4")), prompts=2, steps=4)
    assert 0.9 < rounded["logit_cosine_mean"] < 0.9999, rounded
