"""Kernel tuning at build time: the choices round-trip through engine.json, `--no-tune` and a
build without a GPU are recorded as such, and (on a GPU) the tuned kernels run and give the
untuned engine's outputs."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
import torch
from conftest import PROMPTS, cli

from dist_runtime import LLM, SamplingParams
from dist_runtime.engine import Engine, TuningRecord
from dist_runtime.mapping import Mapping
from dist_runtime.models import build_model
from dist_runtime.tuning import KernelChoices, gemm_key, install

RECORD = {
    "tuned": True, "gpu": "test", "seconds": 1.0,
    "decode_attention": {"1": {"splits": 8, "block_n": 32, "num_warps": 4, "f16": True, "convert_on_load": True,
                               "num_stages": 1, "us": [3.0], "default_us": [6.0]},
                         "4": {"splits": 2, "block_n": 64, "num_warps": 8, "vector": True, "us": [4.0],
                               "default_us": [5.0]},
                         "8": {"splits": 1, "block_n": 64, "num_warps": 4, "num_stages": 2, "fp8_products": True,
                               "us": [4.0, 9.0], "default_us": [6.0, 12.0],
                               "short": {"splits": 1, "block_n": 32, "num_warps": 4, "num_stages": 1,
                                         "fp8_products": True, "context": 256, "us": [3.0]}}},
    "gemm": {gemm_key(96, 64): {"1": {"kernel": "triton", "block_n": 16, "block_k": 256, "num_warps": 4,
                                      "num_stages": 4, "us": 2.0, "cublas_us": 3.0, "best_triton_us": 2.0},
                                "4": {"kernel": "cublas", "us": 2.0, "cublas_us": 2.0, "best_triton_us": 2.5},
                                "64": {"kernel": "cublas", "fast_accumulate": True, "us": 5.0, "cublas_fast_us": 5.0,
                                       "cublas_us": 6.0}}},
    "prefill_attention": {"launch": [128, 64, 4, 2], "tokens": 512, "us": 10.0, "default_us": 12.0},
}


def test_engine_json_keeps_the_tuned_choices_and_the_runner_reads_them(engines, tmp_path):
    engine_dir = tmp_path / "eng"
    shutil.copytree(engines("llama", 1, 1), engine_dir)
    engine = Engine.load(engine_dir)
    engine.tuning = TuningRecord.from_dict(RECORD)
    engine.save()
    choices = KernelChoices.from_record(Engine.load(engine_dir).tuning)
    assert choices.record.to_dict() == RECORD
    # a step takes the smallest tuned bucket that holds it; past the largest, the largest
    assert choices.attention(1) == {"splits": 8, "block_n": 32, "num_warps": 4, "f16": True, "convert_on_load": True,
                                    "num_stages": 1}
    assert choices.attention(3) == choices.attention(4) == {"splits": 2, "block_n": 64, "num_warps": 8, "vector": True}
    assert choices.attention(5) == choices.attention(300) == {"splits": 1, "block_n": 64, "num_warps": 4,
                                                              "fp8_products": True, "num_stages": 2}
    # the launch kept for short contexts, where the tuning kept one
    assert choices.attention(5, short_context_launch=True) == {"splits": 1, "block_n": 32, "num_warps": 4,
                                                               "fp8_products": True, "num_stages": 1}
    assert choices.attention(4, short_context_launch=True) == choices.attention(4)
    assert choices.short_context(8) == choices.short_context(300) == 256 and choices.short_context(4) == 0
    assert choices.gemm(1, 96, 64) == {"block_n": 16, "block_k": 256, "num_warps": 4, "num_stages": 4}
    assert choices.gemm(2, 96, 64) is None  # cuBLAS won at 4 rows
    assert choices.gemm(5, 96, 64) is None and choices.gemm(1, 64, 64) is None  # cuBLAS: timed so, untuned
    # an fp8 _scaled_mm accumulates fast where the tuning timed that faster (past the largest bucket too)
    assert not choices.fast_accumulate(4, 96, 64) and not choices.fast_accumulate(64, 64, 64)
    assert choices.fast_accumulate(5, 96, 64) and choices.fast_accumulate(9000, 96, 64)
    # the prefill kernel's launch; a record without one (float32, or built before it was tuned): the default
    assert choices.prefill() == (128, 64, 4, 2)
    assert KernelChoices(TuningRecord.from_dict({k: v for k, v in RECORD.items() if k != "prefill_attention"})
                         ).prefill() is None


def test_prefill_tuning_times_a_full_step_of_whole_prompts_and_a_chunk():
    from types import SimpleNamespace

    from sharding.autotune import _prefill_step

    assert _prefill_step(SimpleNamespace(max_seq_len=2304, max_num_tokens=8192)) == [(2304, 2304)] * 3 + [(1280, 2304)]
    assert _prefill_step(SimpleNamespace(max_seq_len=128, max_num_tokens=512)) == [(128, 128)] * 4
    assert _prefill_step(SimpleNamespace(max_seq_len=4096, max_num_tokens=2048)) == [(2048, 2048)]


def test_every_layer_with_a_kernel_choice_gets_the_engines(engines):
    engine = Engine.load(engines("llama", 1, 1))
    model = build_model(engine.config, Mapping(), range(engine.config.num_layers), torch.float32, "meta")
    choices = KernelChoices(TuningRecord.from_dict(RECORD))
    install(model, choices)
    users = [m for m in model.modules() if hasattr(m, "kernels")]
    assert len(users) == 5 * engine.config.num_layers + 1  # qkv, attention, o, gate_up, down; the LM head
    assert all(m.kernels is choices for m in users)


def test_fp8_layers_take_their_input_quantized_only_where_scaled_mm_runs():
    """The kernel before an fp8 linear layer quantizes its output for it (an Fp8Rows) unless the
    tuning picked the Triton kernel for that many rows, which reads the input unquantized."""
    from dist_runtime.layers.linear import ColumnParallelLinear
    from dist_runtime.layers.quantized import takes_fp8_rows
    from dist_runtime.quantization import FP8

    layer = ColumnParallelLinear(64, 96, 1, 0, bias=False)
    assert not takes_fp8_rows(layer, 1)  # float weights
    layer.weight.data = layer.weight.data.to(FP8)
    assert takes_fp8_rows(layer, 1) and takes_fp8_rows(layer, 4)  # untuned: _scaled_mm
    layer.kernels = KernelChoices(TuningRecord.from_dict(RECORD))
    assert not takes_fp8_rows(layer, 1)  # Triton won at one row
    assert takes_fp8_rows(layer, 4) and takes_fp8_rows(layer, 64)  # cuBLAS at 4; no Triton past 16 rows
    assert not takes_fp8_rows(None, 1)


def test_the_tuning_times_the_lm_head_unquantized(engines):
    """In an int8 or fp8 engine every GEMM weight is quantized but the LM head's: the build
    times each GEMM with the weights the engine will hold."""
    from sharding.autotune import _shapes

    engine = Engine.load(engines("llama", 1, 1))
    gemms, _ = _shapes(engine.config, engine.plan, torch.bfloat16)
    c = engine.config
    assert {(n, k) for n, k, _, quantized in gemms if not quantized} == {(c.vocab_size, c.hidden_size)}
    assert len(gemms) == 5  # qkv, o, gate_up, down, and the LM head


def test_build_records_no_tune_and_a_build_without_gpu(checkpoints, tmp_path):
    out = cli("build", str(checkpoints["llama"]), "--out", str(tmp_path / "a"), "--no-tune", "--max-batch-size", "4")
    assert out.returncode == 0, out.stderr
    assert "kernel tuning skipped: not asked for (--no-tune)" in out.stdout
    assert json.loads((tmp_path / "a" / "engine.json").read_text())["tuning"] == {
        "tuned": False, "reason": "not asked for (--no-tune)"}
    assert KernelChoices.from_record(Engine.load(tmp_path / "a").tuning) is None
    if torch.cuda.is_available():
        return
    out = cli("build", str(checkpoints["llama"]), "--out", str(tmp_path / "b"), "--max-batch-size", "4")
    assert out.returncode == 0 and "kernel tuning skipped: no CUDA GPU" in out.stdout, out.stderr
    assert Engine.load(tmp_path / "b").tuning == TuningRecord(False, "no CUDA GPU on the build machine")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to tune and run kernels")
@pytest.mark.parametrize("dtype,tolerance", [("bf16", 2e-2), ("int8wo", 2e-2), ("fp8", 0.1)])
def test_tuned_and_forced_kernels_give_the_untuned_outputs(checkpoints, tmp_path, monkeypatch, dtype, tolerance):
    """An engine tuned on this GPU (int8wo and fp8: the Triton kernel reads the quantized
    weights); then the same engine with every GEMM forced to Triton and attention to 4 splits
    (2 in the graphs for short contexts, which every decode step here takes), and with no
    tuning: the same first tokens, logits within bf16 rounding (fp8: within what quantizing the
    activations changes, which the Triton kernel does not do)."""
    if dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMMs need compute capability 8.9+")
    import dist_runtime.kernels.paged_prefill as prefill
    import dist_runtime.kernels.skinny_gemm as skinny
    from sharding.autotune import PREFILL_LAUNCHES
    from sharding.builder import build_engine

    tuned = build_engine(checkpoints["llama"], tmp_path / "tuned", dtype=dtype, progress=False, tune=True,
                         max_batch_size=4, max_seq_len=128)
    record = tuned.tuning
    assert record.tuned and record.gpu == torch.cuda.get_device_name()
    assert sorted(int(b) for b in record.decode_attention) == [1, 2, 4] and record.gemm
    if dtype == "fp8":  # each fp8 GEMM chose how to accumulate at every count, a prefill chunk's (512) too
        fp8_tables = [table for table in record.gemm.values() if "512" in table]
        assert fp8_tables and all("fast_accumulate" in c for t in fp8_tables for c in t.values())
    assert tuple(record.prefill_attention["launch"]) in PREFILL_LAUNCHES
    assert record.prefill_attention["tokens"] == tuned.plan.max_num_tokens
    # every context here is within 128: the short graphs
    short_context_choice = {"splits": 2, "block_n": 64, "num_warps": 8, "context": 128}
    forced = dataclasses.replace(
        record, decode_attention={"4": {"splits": 4, "block_n": 32, "num_warps": 4, "short": short_context_choice}},
        gemm={shape: {"4": {"kernel": "triton", "block_n": 32, "block_k": 128, "num_warps": 4, "num_stages": 3}}
              for shape in record.gemm},
        prefill_attention={"launch": [16, 32, 4, 1]})
    variants = {"tuned": record, "forced": forced, "untuned": None}
    calls, prefill_launches = [], []
    real, real_prefill = skinny.skinny_linear, prefill.paged_prefill_attention
    monkeypatch.setattr(skinny, "skinny_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(prefill, "paged_prefill_attention",
                        lambda *a: prefill_launches.append(a[-1]) or real_prefill(*a))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    results = {}
    for name, tuning in variants.items():
        folder = tmp_path / name
        if name != "tuned":
            shutil.copytree(tmp_path / "tuned", folder)
            engine = Engine.load(folder)
            engine.tuning = tuning
            engine.save()
        calls.clear()
        prefill_launches.clear()
        with LLM(str(folder), device="cuda") as llm:
            runner = llm.coordinator.runner
            assert (runner.kernels is None) == (tuning is None)
            if name == "forced":
                assert runner.graphs.short_contexts == {1: 128, 2: 128, 4: 128}
            results[name] = llm.generate(PROMPTS, params, return_logits=True)
        if name == "forced":
            assert calls  # the Triton GEMM ran (at graph capture and in eager steps)
        # every prompt's attention took the recorded launch, or untuned the default (a bf16 cache here)
        default = prefill.launch_for(tuned.config.head_dim, False, torch.bfloat16)
        assert prefill_launches and set(prefill_launches) == {
            tuple(tuning.prefill_attention["launch"]) if tuning else default}
    for name in ("tuned", "forced"):
        for ours, ref in zip(results[name], results["untuned"]):
            a, b = ours.outputs[0].logits[0], ref.outputs[0].logits[0]
            assert ((a - b).norm() / b.norm()).item() < tolerance
            for x, y in zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs):
                if x.token_id != y.token_id:  # a bf16 near tie may flip; then both are in each other's top 3
                    assert x.token_id in [t for t, _ in y.top] and y.token_id in [t for t, _ in x.top]
                    break


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to tune")
def test_a_rebuild_of_the_same_shapes_takes_its_tuning_from_the_cache_in_seconds(checkpoints, tmp_path, monkeypatch):
    from sharding.autotune import TUNING_CACHE_ENV
    from sharding.builder import build_engine

    monkeypatch.setenv(TUNING_CACHE_ENV, str(tmp_path / "tuning"))
    options = dict(dtype="bf16", progress=False, tune=True, max_batch_size=4, max_seq_len=128)
    first = build_engine(checkpoints["llama"], tmp_path / "a", **options)
    start = time.monotonic()
    second = build_engine(checkpoints["llama"], tmp_path / "b", **options)
    assert time.monotonic() - start < 10
    assert first.tuning.reused_from is None and second.tuning.reused_from.startswith(str(tmp_path / "tuning"))
    assert dataclasses.replace(second.tuning, reused_from=None) == first.tuning
    other = build_engine(checkpoints["llama"], tmp_path / "c", **(options | {"max_batch_size": 8}))
    assert other.tuning.reused_from is None  # other batch buckets: timed afresh
