"""Building engines: what goes in the rank files, what is refused, refit, and memory use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import SMALL_PLAN, cli, json_lines
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_runtime.engine import FORMAT_VERSION, Engine
from dist_runtime.errors import CheckpointError, EngineError
from dist_runtime.presets import preset_config
from sharding.builder import build_engine, refit_engine
from sharding.synth import write_checkpoint


def _copy_without(src, dst, drop: str | None = None, reshape: str | None = None):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].clone()
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_engine_holds_one_file_per_rank_with_checksums_and_the_plan(engines):
    engine = Engine.load(engines("llama", 2, 2))
    assert sorted(engine.files) == [f"rank-{r:05d}.safetensors" for r in range(4)]
    meta = json.loads((engine.path / "engine.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["plan"]["tp"] == 2 and meta["build"]["dtype"] == "fp32"
    with safe_open(str(engine.rank_path(2)), "pt") as f:  # stage 1 holds layers 2-3 and the head only
        names = set(f.keys())
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    assert not any(".layers.0." in n or ".layers.1." in n for n in names)
    assert (engine.path / "tokenizer.json").is_file()


def test_qkv_and_gate_up_are_fused_and_sliced_per_rank(checkpoints, engines):
    ref = load_file(checkpoints["llama"] / "model-00001-of-00004.safetensors") | {}
    for i in range(2, 5):
        ref |= load_file(checkpoints["llama"] / f"model-{i:05d}-of-00004.safetensors")
    rank1 = Engine.load(engines("llama", 2, 1)).load_rank_weights(1)
    q, k, v = (ref[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    fused = rank1["model.layers.0.self_attn.qkv_proj.weight"]
    assert fused.equal(torch.cat([q[32:], k[16:], v[16:]]))  # head 2-3; KV head 1
    gate, up = ref["model.layers.0.mlp.gate_proj.weight"], ref["model.layers.0.mlp.up_proj.weight"]
    assert rank1["model.layers.0.mlp.gate_up_proj.weight"].equal(torch.cat([gate[80:], up[80:]]))


def test_missing_tensor_is_named(checkpoints, tmp_path):
    bad = _copy_without(checkpoints["llama-tied"], tmp_path / "ckpt", drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="tensors missing, e.g. model.layers.1.mlp.up_proj.weight"):
        build_engine(bad, tmp_path / "eng", progress=False)


def test_shape_mismatch_is_named(checkpoints, tmp_path):
    bad = _copy_without(checkpoints["llama-tied"], tmp_path / "ckpt", reshape="model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[31, 64\]"):
        build_engine(bad, tmp_path / "eng", progress=False)


def test_an_unknown_dtype_is_refused_by_name(checkpoints, tmp_path):
    with pytest.raises(EngineError, match="--dtype int2"):
        build_engine(checkpoints["llama"], tmp_path / "eng", dtype="int2", progress=False)


@pytest.mark.slow
def test_corrupt_rank_file_is_refused_naming_the_file(engines, tmp_path):
    engine = shutil.copytree(engines("llama", 2, 1), tmp_path / "eng")
    with open(engine / "rank-00001.safetensors", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\xff" * 10)
    proc = cli("generate", str(engine), "--prompt", "hi")
    assert proc.returncode == 1
    assert "rank 1:" in proc.stderr and "rank-00001.safetensors: corrupt" in proc.stderr


def test_missing_rank_file_and_other_format_version_are_refused(engines, tmp_path):
    engine = shutil.copytree(engines("llama", 1, 1), tmp_path / "eng")
    meta = json.loads((engine / "engine.json").read_text())
    (engine / "engine.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(EngineError, match=f"format version 99, this runtime reads version {FORMAT_VERSION}"):
        Engine.load(engine)
    (engine / "engine.json").write_text(json.dumps(meta))
    (engine / "rank-00000.safetensors").unlink()
    with pytest.raises(EngineError, match="rank-00000.safetensors: missing"):
        Engine.load(engine).load_rank_weights(0)


@pytest.mark.slow
def test_refit_gives_the_tokens_of_a_fresh_build(checkpoints, tmp_path):
    other = write_checkpoint(preset_config("tiny", "llama"), tmp_path / "other", seed=5, progress=False)
    refit = build_engine(checkpoints["llama"], tmp_path / "refit", 2, 2, "fp32", progress=False, **SMALL_PLAN)
    before = json_lines(cli("generate", str(refit.path), "--temperature", "0", "--json", "--prompt", "hi"))
    refit_engine(refit.path, other, progress=False)
    fresh = build_engine(other, tmp_path / "fresh", 2, 2, "fp32", progress=False, **SMALL_PLAN)
    after = json_lines(cli("generate", str(refit.path), "--temperature", "0", "--json", "--prompt", "hi"))
    assert after == json_lines(cli("generate", str(fresh.path), "--temperature", "0", "--json", "--prompt", "hi"))
    assert after != before


def test_refit_with_other_shapes_is_refused(checkpoints, engines, tmp_path):
    with pytest.raises(CheckpointError, match="refit needs the same architecture and shapes"):
        refit_engine(shutil.copytree(engines("llama", 1, 1), tmp_path / "eng"), checkpoints["gptj"])


PEAK_RSS = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peak_rss(*cmd: str) -> int:
    return int(subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], check=True, capture_output=True,
                              text=True).stdout)


@pytest.mark.slow
def test_build_streams_tensors_instead_of_loading_the_model(tmp_path):
    config = preset_config("tiny", "llama") | {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                                               "num_attention_heads": 8, "head_dim": 64, "vocab_size": 32000}
    ckpt = write_checkpoint(config, tmp_path / "ckpt", progress=False)
    model_bytes = (ckpt / "model.safetensors").stat().st_size  # 233 MB, its largest tensor 66 MB
    baseline = _peak_rss(sys.executable, "-c", "import torch, sharding.builder, safetensors")
    peak = _peak_rss(sys.executable, "-m", "dist_runtime.cli", "build", str(ckpt), "--tp", "2",
                     "--out", str(tmp_path / "eng"))
    assert peak - baseline < 0.6 * model_bytes, (peak, baseline, model_bytes)


def test_a_checkpoint_without_weights_builds_the_engine_its_written_weights_would(tmp_path):
    """`synth --no-weights`: the build draws each tensor as synth would have written it."""
    for weights in ("--no-weights", None):
        ckpt = tmp_path / f"ckpt{weights or ''}"
        assert cli("synth", "--preset", "tiny", "--arch", "mixtral", "--seed", "3", "--out", str(ckpt),
                   *([weights] if weights else [])).returncode == 0
        assert cli("build", str(ckpt), "--tp", "2", "--ep", "2", "--out", str(tmp_path / f"eng{weights or ''}"),
                   "--no-tune").returncode == 0
    assert not list((tmp_path / "ckpt--no-weights").glob("*.safetensors"))
    drawn, written = (Engine.load(tmp_path / name) for name in ("eng--no-weights", "eng"))
    assert drawn.files == written.files  # every rank file's sha256
