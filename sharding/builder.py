"""Build an engine from a checkpoint: slice every weight per the plan, fuse, cast, and write
one file per rank. Tensors stream from the memory-mapped checkpoint one at a time, each read
once for all the TP ranks of a stage, so peak memory is a few tensors, not the model."""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dist_runtime.config import ModelConfig
from dist_runtime.engine import BuildRecord, Engine, rank_file_name, sha256_of, tokenizer_files
from dist_runtime.errors import CheckpointError, EngineError
from dist_runtime.models import build_model, checkpoint_layout
from dist_runtime.plan import DTYPES, Plan
from dist_runtime.quantization import DEFAULT_KV_SCALE, INT4_DTYPES
from dist_runtime.tokenizer import Tokenizer
from dist_runtime.tuning import skipped
from sharding import rank_tensors
from sharding.autotune import tune_kernels
from sharding.calibrate import calibrate
from sharding.checkpoint import Checkpoint
from sharding.planner import make_plan
from sharding.safetensors_writer import StreamingWriter
from sharding.synth import open_checkpoint

BUILDABLE = ("fp32", "fp16", "bf16", "int8wo", "fp8", *INT4_DTYPES)


def check_checkpoint(ck: Checkpoint) -> None:
    """Every tensor the model needs is present with the shape it expects."""
    expected = {name: shape for name, shape, _ in checkpoint_layout(ck.config)}
    missing = sorted(set(expected) - ck.names())
    if missing:
        raise CheckpointError(f"{ck.path}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    for name, shape in expected.items():
        found = ck.shape(name)
        if found != shape:
            raise CheckpointError(f"{ck.path}: tensor {name!r} has shape {list(found)}, the config implies "
                                  f"{list(shape)}")


def build_engine(checkpoint: str | Path, out: str | Path, tp: int = 1, pp: int = 1, dtype: str = "bf16",
                 progress: bool = True, tune: bool = False, calib: str | Path | None = None,
                 **plan_options) -> Engine:
    """`tune`: time the kernel candidates on this machine's GPU (if it has one) and record the
    winners in engine.json; the runner uses them as they are. `dist-runtime build` tunes
    unless told --no-tune; here it is asked for, as it holds the GPU for a while. `calib`: a
    text file to calibrate static fp8 scales on (sharding/calibrate.py), for the GEMM inputs of
    an fp8 engine and for an fp8 KV cache; without one, fp8 activations scale per token and an
    fp8 KV cache takes DEFAULT_KV_SCALE."""
    if dtype not in BUILDABLE:
        raise EngineError(f"--dtype {dtype}: this build step writes {', '.join(BUILDABLE)} engines")
    ck = open_checkpoint(checkpoint)
    check_checkpoint(ck)
    if (ck.path / "tokenizer.json").is_file():
        Tokenizer(ck.path)  # a tokenizer file that does not parse is refused here, not when serving
    plan = make_plan(ck.config, tp, pp, dtype, **(ck.scheme.plan_options() if ck.scheme else {}), **plan_options)
    ranges = None
    if calib is not None:
        if dtype != "fp8" and plan.kv_cache_dtype != "fp8":
            raise EngineError(f"--calib {calib}: calibration sets fp8 scales, and a {dtype} engine with its KV "
                              f"cache in {plan.kv_cache_dtype} has none; add --dtype fp8 or --kv-cache-dtype fp8")
        ranges = calibrate(ck, calib, plan.max_seq_len, plan.block_size, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_rank_files(ck, plan, out, progress, ranges.input_scales() if ranges and dtype == "fp8" else None)
    for name in tokenizer_files(out):  # those left by an earlier build into this folder are not this engine's
        (out / name).unlink()
    for name in tokenizer_files(ck.path):
        (out / name).parent.mkdir(exist_ok=True)
        shutil.copy(ck.path / name, out / name)
    copied = {name: sha256_of(out / name) for name in tokenizer_files(out)}
    build = BuildRecord(dtype, str(ck.path.resolve()), ck.config.dtype, _utc_now())
    if ranges is not None:
        build.calibration = {"text": str(Path(calib).resolve()), "tokens": ranges.tokens}
    if plan.kv_cache_dtype == "fp8":  # {"k": [layer][kv head], "v": the same}
        build.kv_scales = ranges.kv_scales() if ranges is not None else {
            kv: [[DEFAULT_KV_SCALE] * ck.config.num_kv_heads] * ck.config.num_layers for kv in "kv"}
    tuning = tune_kernels(ck.config, plan) if tune else skipped("not asked for (--no-tune)")
    engine = Engine(out, ck.config, plan, build, files, tuning, copied)
    engine.save()
    return engine


def refit_engine(engine_dir: str | Path, checkpoint: str | Path, progress: bool = True) -> Engine:
    """Swap in the weights of another checkpoint of the same architecture and shapes."""
    engine = Engine.load(engine_dir)
    if engine.build.calibration is not None:
        raise EngineError(f"{engine_dir}: its fp8 scales were calibrated on the weights it has; rebuild it with "
                          f"--calib for new weights")
    ck = open_checkpoint(checkpoint)
    if _shape_fields(ck.config) != _shape_fields(engine.config):
        raise CheckpointError(f"{ck.path}: its config differs from the engine's in more than the dtype; "
                              f"refit needs the same architecture and shapes (rebuild instead)")
    check_checkpoint(ck)
    engine.files = write_rank_files(ck, engine.plan, engine.path, progress)
    engine.build = dataclasses.replace(engine.build, checkpoint=str(ck.path.resolve()), refit_at=_utc_now())
    engine.save()
    return engine


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _shape_fields(config: ModelConfig) -> dict:
    fields = config.to_dict()
    fields.pop("dtype")
    return fields


def write_rank_files(ck: Checkpoint, plan: Plan, out: Path, progress: bool,
                     input_scales: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Write every rank's file (to a temporary name, renamed when complete); return checksums.
    `input_scales`: calibrated fp8 GEMM input scales by weight name, each beside its weight
    (else a pre-quantized checkpoint's own, where it has them; see sharding/rank_tensors.py)."""
    dtype = DTYPES[plan.dtype][0]
    total = sum(len(r.weights) for r in plan.ranks)
    bar = tqdm(total=total, unit="tensor", desc=f"build {out}", disable=not progress)
    files = {}
    for stage in range(plan.pp):
        mappings = [plan.mapping(stage * plan.tp + t) for t in range(plan.tp)]
        models = [build_model(ck.config, m, plan.layer_range(stage), dtype) for m in mappings]
        params = [dict(model.named_parameters()) for model in models]
        form = rank_tensors.forms(ck, plan, models[0], input_scales)
        writers = [StreamingWriter(out / (rank_file_name(m.rank) + ".tmp"),
                                   [spec for name, param in rank_params.items()
                                    for spec in rank_tensors.specs(name, param, form[name], dtype, plan.dtype)])
                   for m, rank_params in zip(mappings, params)]
        for name in params[0]:
            read = None  # (names, what they hold): TP ranks side by side share theirs (an expert group's)
            for model, writer, rank_params in zip(models, writers, params):
                names = model.checkpoint_names(name)
                if read is None or read[0] != names:
                    read = names, rank_tensors.read(ck, names, form[name])
                for tensor_name, tensor in rank_tensors.rank_tensors(name, rank_params[name], form[name], read[1],
                                                                     dtype, plan.dtype):
                    writer.write(tensor_name, tensor)
            bar.update(len(writers))
        for m, writer in zip(mappings, writers):
            sha = writer.close()
            final = out / rank_file_name(m.rank)
            writer.path.replace(final)
            files[final.name] = {"sha256": sha, "bytes": writer.nbytes}
    bar.close()
    return files
