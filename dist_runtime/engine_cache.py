"""Models served without a build step: `serve`, `generate`, `bench` and `LLM` take a Hugging
Face checkpoint folder, or a Hub id in the local Hugging Face cache, as well as an engine
folder. A model's engine is built on first use into a cache folder named by the checkpoint's
content and the build options, and every later start with the same ones reuses it.

Only what is in the weights keys the cache (layout, precision); the serving limits are set at
each start (RuntimeConfig), so changing them never rebuilds."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from dist_runtime.config import ModelConfig, read_config_json
from dist_runtime.engine import ENGINE_JSON, FORMAT_VERSION, Engine, sha256_of, tokenizer_files
from dist_runtime.errors import ConfigError, EngineError
from dist_runtime.runtime_config import RuntimeConfig
from sharding.builder import BUILDABLE, build_engine
from sharding.prequantized import read_scheme

CACHE_ENV = "DIST_RUNTIME_ENGINE_CACHE"
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
# The checkpoint files an engine is made of: config, weights, tokenizer and chat template
WEIGHT_FILES = ("*.json", "*.safetensors")

Say = Callable[[str], None]


def cache_dir(config: RuntimeConfig) -> Path:
    return Path(config.engine_cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dist-runtime" / "engines")


def resolve_model(name: str) -> Path:
    """The folder `name` is: a path, or a Hub id (`org/model`) in the local Hugging Face cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{name}: not a folder (an engine folder, a Hugging Face checkpoint folder or a Hub id)")
    if HUB_ID.fullmatch(name):
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except LocalEntryNotFoundError:
            raise ConfigError(f"{name}: no such folder, and no snapshot of a Hub model {name!r} in the Hugging Face "
                              f"cache ({constants.HF_HUB_CACHE}); download it first (`hf download {name}`) on a "
                              f"machine with access to the Hub") from None
    raise ConfigError(f"{name}: no such folder")


def prepare(config: RuntimeConfig, say: Say | None = None) -> RuntimeConfig:
    """`config` with engine_dir an engine folder: the one it names, or the cached engine of the
    model it names, built now if there is none yet. `say` tells which (a line)."""
    folder = resolve_model(config.engine_dir)
    if (folder / ENGINE_JSON).is_file():
        _check_build_options(config, Engine.load(folder))
        return dataclasses.replace(config, engine_dir=str(folder))
    read_config_json(folder)  # neither an engine nor a checkpoint: say so before anything else
    options = build_options(config, folder)
    cache = cache_dir(config)
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "checkpoint": checkpoint_hash(folder, cache),
                                     "options": options}, sort_keys=True).encode()).hexdigest()[:16]
    engine_dir = cache / f"{folder.name}-{_layout_name(options)}-{key}"
    with _locked(cache / f"{engine_dir.name}.lock"):  # one build, whichever rank or job comes first
        if _usable(engine_dir):
            if say:
                say(f"engine: {engine_dir} (built earlier from {folder})")
        else:
            _build(folder, engine_dir, options, config, say)
    return dataclasses.replace(config, engine_dir=str(engine_dir))


def build_options(config: RuntimeConfig, checkpoint: Path) -> dict:
    """What the engine of `checkpoint` is built with: the config's, else the defaults."""
    dtype = config.dtype or default_dtype(checkpoint, config.device)
    if dtype not in BUILDABLE:
        raise ConfigError(f"dtype {dtype!r} is not one an engine is built in; one of {', '.join(BUILDABLE)}")
    return {"tp": config.tp or 1, "pp": config.pp or 1, "ep": config.ep or 1, "dtype": dtype,
            "kv_cache_dtype": config.kv_cache_dtype or "auto"}


def _layout_name(options: dict) -> str:
    """e.g. tp2-pp1-fp8, or tp8-pp2-ep8-fp8-kvfp8: a cached engine's name says what it is."""
    parts = [f"tp{options['tp']}", f"pp{options['pp']}", *([f"ep{options['ep']}"] if options["ep"] > 1 else []),
             options["dtype"], *(["kvfp8"] if options["kv_cache_dtype"] == "fp8" else [])]
    return "-".join(parts)


def default_dtype(checkpoint: Path, device: str) -> str:
    """A pre-quantized checkpoint's own precision (fp8, int4), else bf16 on GPUs and the float32
    reference on CPUs. A quantization no engine reads is refused here, by name."""
    scheme = read_scheme(checkpoint)
    if scheme is not None:
        return scheme.kind
    return "fp32" if device == "cpu" else "bf16"


def _check_build_options(config: RuntimeConfig, engine: Engine) -> None:
    """Build options given beside an engine folder must be the ones it was built with."""
    built = {"tp": engine.plan.tp, "pp": engine.plan.pp, "ep": engine.plan.ep, "dtype": engine.plan.dtype,
             "kv_cache_dtype": engine.plan.kv_cache_dtype}
    for name, value in built.items():
        asked = getattr(config, name)
        if asked is not None and asked != value:
            raise ConfigError(f"{name} {asked}: the engine {engine.path} was built with {name} {value}; give the "
                              f"checkpoint it was built from ({engine.build.checkpoint}) to have another built")


def checkpoint_hash(folder: Path, cache: Path) -> str:
    """sha256 over the checkpoint's config, weight and tokenizer files. A file's own sha256 is
    remembered by (path, size, mtime) in the cache, so that only a changed or new file is read
    again (a 16 GB checkpoint takes about a minute the first time)."""
    memo_file = cache / "file-hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    names = sorted({p.name for pattern in WEIGHT_FILES for p in folder.glob(pattern)} | set(tokenizer_files(folder)))
    files = [(name, (folder / name).resolve()) for name in names]
    todo = [path for _, path in files if memo.get(str(path), [None])[:2] != _stamp(path)]
    with tqdm(total=sum(p.stat().st_size for p in todo), unit="B", unit_scale=True, desc=f"hash {folder}",
              disable=not todo or not sys.stderr.isatty()) as bar:
        for path in todo:
            memo[str(path)] = [*_stamp(path), sha256_of(path)]
            bar.update(path.stat().st_size)
    if todo:
        tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return hashlib.sha256(json.dumps([(name, memo[str(path)][2]) for name, path in files]).encode()).hexdigest()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _usable(engine_dir: Path) -> bool:
    """Whether the cache holds a whole engine there (an interrupted build leaves none)."""
    try:
        Engine.load(engine_dir)
    except EngineError:
        return False
    return True


def _build(checkpoint: Path, engine_dir: Path, options: dict, config: RuntimeConfig, say: Say | None) -> None:
    partial = engine_dir.with_name(engine_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(engine_dir, ignore_errors=True)  # an unusable one
    if say:
        say(f"engine: building {checkpoint} (tp={options['tp']} x pp={options['pp']}, {options['dtype']}) into "
            f"{engine_dir}")
    start = time.monotonic()
    # The planned limits are only the defaults of each start's: a GPU's KV cache is sized by its
    # memory, so there the defaults are the model's whole length and a batch worth a GPU
    gpu = config.device != "cpu"
    limits = {"max_batch_size": 256, "max_seq_len": ModelConfig.from_dir(checkpoint).max_position_embeddings}
    build_engine(checkpoint, partial, options["tp"], options["pp"], options["dtype"], progress=sys.stderr.isatty(),
                 tune=config.tune and gpu, kv_cache_dtype=options["kv_cache_dtype"], ep=options["ep"],
                 **(limits if gpu else {}))
    partial.rename(engine_dir)
    if say:
        say(f"engine: built in {time.monotonic() - start:.1f} s")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
