"""Calibration (`build --calib`): the float32 reference run keeps the largest GEMM inputs and
the largest rotated keys and values per KV head; their scales land in the rank files and
engine.json, and each rank loads its own; bad input is refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import CALIB_TEXT, SMALL_PLAN, cli

from dist_runtime.accuracy import compare
from dist_runtime.engine import Engine
from dist_runtime.errors import CalibrationError, EngineError
from dist_runtime.layers.attention import AttentionMetadata
from dist_runtime.layers.linear import ColumnParallelLinear, RowParallelLinear
from dist_runtime.model_runner import ModelRunner
from dist_runtime.quantization import FP8_MAX
from sharding.builder import build_engine, refit_engine
from sharding.calibrate import calibrate, read_tokens, reference_model
from sharding.checkpoint import Checkpoint

CHUNK = 100  # the corpus is some 900 tokens: several chunks, the last one short


@pytest.fixture(scope="module")
def calibrated(checkpoints, tmp_path_factory):
    """llama at tp=2 (one of its 2 KV heads per rank), fp8 GEMMs and KV cache, calibrated."""
    out = tmp_path_factory.mktemp("calibrated") / "llama-fp8"
    return build_engine(checkpoints["llama"], out, 2, 1, "fp8", progress=False, calib=CALIB_TEXT,
                        kv_cache_dtype="fp8", **SMALL_PLAN)


def test_calibration_keeps_the_largest_gemm_inputs_and_rotated_keys_and_values(checkpoints):
    """Against hooks on a plain run of the same chunks (Llama calls its column-parallel layers'
    forward and its row-parallel layers' `partial`, whose all-reduce joins the next norm; the
    attention hook rotates the keys as the cache write does)."""
    ck = Checkpoint(checkpoints["llama"])
    ranges = calibrate(ck, CALIB_TEXT, CHUNK, progress=False)
    ids = read_tokens(ck, CALIB_TEXT)
    model = reference_model(ck)
    inputs, keys, values = {}, torch.zeros(4, 2), torch.zeros(4, 2)

    def record(name, x):
        inputs[name] = max(inputs.get(name, 0.0), x.abs().max().item())

    def partial_recording(module, name):
        return lambda x: module.__class__.partial(module, record(name, x) or x)

    def kv_hook(layer):
        def hook(module, args):
            q, k, v, meta, rotary, positions = args
            keys[layer] = torch.maximum(keys[layer], rotary.reference(positions, q, k)[1].abs().amax(dim=(0, 2)))
            values[layer] = torch.maximum(values[layer], v.abs().amax(dim=(0, 2)))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, ColumnParallelLinear):
            module.register_forward_pre_hook(lambda _, args, name=f"{name}.weight": record(name, args[0]))
        elif isinstance(module, RowParallelLinear):
            module.partial = partial_recording(module, f"{name}.weight")
    for layer, attn in enumerate(model.attention_layers()):
        attn.register_forward_pre_hook(kv_hook(layer))
    with torch.inference_mode():
        for start in range(0, len(ids), CHUNK):
            n = len(ids[start:start + CHUNK])
            for attn in model.attention_layers():
                attn.k_cache = torch.zeros(-(-n // 16), 16, attn.num_kv_heads, attn.head_dim)
                attn.v_cache = torch.zeros_like(attn.k_cache)
            model(torch.tensor(ids[start:start + CHUNK]), torch.arange(n),
                  AttentionMetadata(torch.arange(n), [0, n], [n], torch.arange(-(-n // 16))[None]))
    assert ranges.tokens == len(ids) and len(ids) % CHUNK and len(ids) > 3 * CHUNK
    assert len(inputs) == 4 * 4 and ranges.inputs == pytest.approx(inputs)
    assert torch.allclose(ranges.keys, keys) and torch.allclose(ranges.values, values)


def test_calibration_sees_the_gemms_a_model_sums_itself(checkpoints):
    """GPT-J adds its attention and MLP partial sums before one all-reduce, calling the
    row-parallel layers' `partial` rather than their forward: those inputs count too."""
    ck = Checkpoint(checkpoints["gptj"])
    model = reference_model(ck)
    ranges = calibrate(ck, CALIB_TEXT, CHUNK, progress=False)
    assert set(ranges.inputs) == {name for name, p in model.named_parameters() if p.is_linear_weight}
    assert all(amax > 0 for amax in ranges.inputs.values())


def test_calibrated_scales_land_in_the_engine_and_each_rank_loads_its_own(calibrated, checkpoints, monkeypatch):
    ranges = calibrate(Checkpoint(checkpoints["llama"]), CALIB_TEXT, calibrated.plan.max_seq_len, progress=False)
    engine = Engine.load(calibrated.path)
    assert engine.build.calibration["tokens"] == ranges.tokens
    kv_scales = engine.build.kv_scales
    assert torch.allclose(torch.tensor(kv_scales["k"]), ranges.keys / FP8_MAX)
    assert torch.allclose(torch.tensor(kv_scales["v"]), ranges.values / FP8_MAX)
    # fp8 GEMM weights load on the CPU only past the device check; they are not run here
    monkeypatch.setattr("dist_runtime.model_runner.check_device", lambda *args, **kwargs: None)
    for rank in range(2):
        runner = ModelRunner(engine, engine.plan.mapping(rank), None, "cpu", verify=True, kv_cache_fraction=1.0)
        for name, module in runner.model.named_modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                assert module.input_scale.shape == (1,)
                assert module.input_scale.item() == pytest.approx(ranges.inputs[f"{name}.weight"] / FP8_MAX)
        for layer, attn in enumerate(runner.model.attention_layers()):  # KV head `rank` of 2
            assert attn.k_scale.tolist() == pytest.approx([kv_scales["k"][layer][rank]])
            assert attn.v_scale.tolist() == pytest.approx([kv_scales["v"][layer][rank]])


@pytest.mark.slow
def test_calibrated_fp8_kv_cache_on_two_ranks_stays_close_to_float32(engines, checkpoints, tmp_path):
    """Measured: cosine 0.99979, top-1 0.971 (with the default scale 1: 0.99976, 0.964)."""
    plan = SMALL_PLAN | dict(max_seq_len=256)
    engine = build_engine(checkpoints["llama"], tmp_path / "kv-fp8", 2, 1, "fp32", progress=False, calib=CALIB_TEXT,
                          kv_cache_dtype="fp8", **plan)
    report = compare(str(engines("llama", 1, 1, "fp32", **plan)), str(engine.path))
    assert report["logit_cosine_mean"] > 0.999 and report["top1_agreement"] > 0.94, report


def test_calibration_shows_its_progress_on_stderr(checkpoints, capsys):
    ranges = calibrate(Checkpoint(checkpoints["llama"]), CALIB_TEXT, CHUNK, progress=True)
    assert f"{ranges.tokens}/{ranges.tokens}" in capsys.readouterr().err


def test_a_missing_or_empty_text_or_nothing_to_calibrate_is_refused_by_name(checkpoints, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(CalibrationError, match="empty"):
        build_engine(checkpoints["llama"], tmp_path / "e", dtype="fp8", progress=False, calib=empty)
    with pytest.raises(EngineError, match="--kv-cache-dtype fp8"):
        build_engine(checkpoints["llama"], tmp_path / "e", dtype="bf16", progress=False, calib=CALIB_TEXT)
    run = cli("build", str(checkpoints["llama"]), "--dtype", "fp8", "--calib", str(tmp_path / "nope.txt"), "--out",
              str(tmp_path / "e"))
    assert run.returncode == 1 and "nope.txt: no such file" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "e").exists()  # refused before anything is written


def test_refit_refuses_a_calibrated_engine(calibrated, checkpoints):
    with pytest.raises(EngineError, match="rebuild it with --calib"):
        refit_engine(calibrated.path, checkpoints["llama"], progress=False)
