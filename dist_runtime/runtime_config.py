"""How a job runs an engine, as one typed record: built once (from the CLI's flags over a
--config file, or from LLM's keywords) and handed to every rank as data. Spawned and Ray ranks
get it from their executor; under mpirun or srun every rank builds it from the same command
line. Each default is written here and read from here by the CLI, the Python API and the ranks."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from dist_runtime import records
from dist_runtime.errors import ConfigError

LAUNCHERS = ("local", "ray")
CAPACITY_POLICIES = ("max_utilization", "no_evict")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    # An engine folder; or a model to build one from on first use (a Hugging Face checkpoint
    # folder, or a Hub id in the local Hugging Face cache), cached in `engine_cache` (engine_cache.py)
    engine_dir: str
    device: str = "cpu"  # or cuda: each rank takes GPU local_rank of its node
    verify: bool = True  # check each rank file's sha256 against engine.json before loading it
    kv_cache_fraction: float = 0.9  # of the GPU memory left free after loading and a profiling forward
    rank_timeout_s: float = 30.0  # a rank silent or stuck in one step this long is lost, and the job stops
    overlap: bool = True  # schedule a step while the device runs the one before (pp > 1: a micro-batch per stage)
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix another request computed
    num_kv_blocks: int | None = None  # at most this many KV blocks (None: as many as fit)
    # max_utilization: admit while the cache has room now, preempting (and recomputing) the newest
    # when it fills; no_evict: admit only what the cache holds to its longest, never preempting
    capacity_policy: str = "max_utilization"
    launcher: str = "local"  # who starts ranks 1..N-1 when no launcher started this process: "local" or "ray"
    ray_address: str | None = None  # with launcher "ray": HOST:PORT or "auto"; None: auto, else a new local Ray
    # Serving limits, over those the engine was planned with (None: the plan's)
    max_batch_size: int | None = None  # sequences running at once
    max_seq_len: int | None = None  # tokens a sequence may hold, prompt and output; at most the model's positions
    max_num_tokens: int | None = None  # tokens one step may carry (prompt chunks and decodes)
    # How a model is built into an engine on first use (None: as the engine_cache module decides);
    # given with an engine folder, they must be what it was built with
    tp: int | None = None
    pp: int | None = None
    ep: int | None = None  # expert-parallel groups of each TP group (mixtures of experts)
    # the engine's precision (build --dtype); None: the checkpoint's own quantization, else bf16 on GPUs, fp32 on CPUs
    dtype: str | None = None
    kv_cache_dtype: str | None = None  # auto or fp8
    # where built engines are kept; None: $DIST_RUNTIME_ENGINE_CACHE, else ~/.cache/dist-runtime/engines
    engine_cache: str | None = None
    tune: bool = True  # time kernel candidates on the GPU when building (as `build` does unless --no-tune)

    def __post_init__(self) -> None:
        for name, hint in _HINTS.items():
            value = getattr(self, name)
            if not _accepts(hint, value):
                kinds = " or ".join(_KIND_NAMES[kind] for kind in typing.get_args(hint) or (hint,))
                raise ConfigError(f"{name} must be {kinds}, got {value!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be cpu or cuda (each rank takes GPU local_rank), got {self.device!r}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ConfigError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.rank_timeout_s <= 0:
            raise ConfigError(f"rank_timeout_s must be above 0, got {self.rank_timeout_s}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "tp", "pp", "ep"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise ConfigError(f"capacity_policy must be one of {', '.join(CAPACITY_POLICIES)}, "
                              f"got {self.capacity_policy!r}")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")

    @classmethod
    def from_dict(cls, values: Any, source: str) -> RuntimeConfig:
        """From the options of `source` (a --config file with the flags over it, LLM's keywords)."""
        if isinstance(values, dict) and "engine_dir" not in values:
            raise ConfigError(f"{source}: no engine folder given (engine_dir)")
        try:
            return records.from_dict(cls, values, source)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> RuntimeConfig:
        """The options of a YAML file (`key: value` lines, keys as the fields above), with
        `overrides` (the flags given beside it) over them."""
        try:
            values = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not YAML ({e})") from None
        if values is None:  # an empty file
            values = {}
        return cls.from_dict({**values, **overrides} if isinstance(values, dict) else values, path)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RuntimeConfig:
        return cls.from_dict(json.loads(text), "the job's runtime config")


_HINTS = typing.get_type_hints(RuntimeConfig)
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _accepts(hint: Any, value: Any) -> bool:
    kinds = typing.get_args(hint) or (hint,)
    if isinstance(value, bool):  # an int to Python, not to a config
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))
