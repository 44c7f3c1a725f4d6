"""An engine folder: `engine.json` (format version, model config, plan, build options,
checksums, tuned kernel choices) and one `rank-XXXXX.safetensors` per rank, plus the
tokenizer files. engine.json holds the sha256 of every other file of the folder and a checksum
of its own content, so an engine runs only as it was built: an edited `rope_theta` would
otherwise run, silently, as another model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from dist_runtime import records
from dist_runtime.config import ModelConfig
from dist_runtime.errors import EngineError
from dist_runtime.plan import DTYPES, Plan
from dist_runtime.runtime_config import RuntimeConfig

# 2: engine.json holds a checksum of itself and of the tokenizer files; 3: its model config
# names qkv_bias and o_proj_bias apart (Qwen2) and lists each layer's attention type
FORMAT_VERSION = 3
ENGINE_JSON = "engine.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")
CHAT_TEMPLATES_DIR = "additional_chat_templates"  # named chat templates, one .jinja file each


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files a checkpoint or engine folder holds, named relative to it."""
    named = [f"{CHAT_TEMPLATES_DIR}/{f.name}" for f in sorted((folder / CHAT_TEMPLATES_DIR).glob("*.jinja"))]
    return [name for name in TOKENIZER_FILES if (folder / name).is_file()] + named


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


class _Record:
    """One of engine.json's records, stored under KEY: written without its unset fields, read
    back with any key it has no field for refused by name."""

    KEY: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return records.to_dict(self)

    @classmethod
    def from_dict(cls, values: Any) -> _Record:
        return records.from_dict(cls, values, cls.KEY)


@dataclasses.dataclass
class BuildRecord(_Record):
    """engine.json's "build": what the engine was built from, and how."""

    KEY: ClassVar[str] = "build"

    dtype: str  # the engine's, as `build --dtype` takes it
    checkpoint: str  # the checkpoint folder, resolved
    checkpoint_dtype: str
    built_at: str  # UTC, ISO 8601
    calibration: dict[str, Any] | None = None  # --calib: {"text": the file, "tokens": how many it held}
    kv_scales: dict[str, list[list[float]]] | None = None  # fp8 KV cache: {"k" | "v": [layer][kv head]}
    refit_at: str | None = None  # when `refit` last swapped in another checkpoint's weights


@dataclasses.dataclass
class TuningRecord(_Record):
    """engine.json's "tuning": the winners the build timed on its GPU, or why it timed none."""

    KEY: ClassVar[str] = "tuning"

    tuned: bool
    reason: str | None = None  # why not, when not tuned
    gpu: str | None = None
    torch: str | None = None  # versions the kernels were timed with
    triton: str | None = None
    decode_attention: dict[str, dict[str, Any]] | None = None  # decode batch bucket -> launch and times
    gemm: dict[str, dict[str, dict[str, Any]]] | None = None  # gemm_key -> rows bucket -> kernel and times
    prefill_attention: dict[str, Any] | None = None  # the prefill kernel's launch; none for float32 engines
    seconds: float | None = None  # how long the tuning took
    reused_from: str | None = None  # the tuning cache's file these winners came from, timed by an earlier build


@dataclasses.dataclass
class Engine:
    path: Path
    config: ModelConfig
    plan: Plan
    build: BuildRecord
    files: dict[str, dict[str, Any]]  # rank file name -> {"sha256", "bytes"}
    tuning: TuningRecord | None = None  # kernel choices timed at build (dist_runtime/tuning.py); None: older engine
    tokenizer_files: dict[str, str] = dataclasses.field(default_factory=dict)  # file name -> sha256

    @classmethod
    def load(cls, path: str | Path) -> Engine:
        path = Path(path)
        meta_file = path / ENGINE_JSON
        if not meta_file.is_file():
            raise EngineError(f"{path}: no {ENGINE_JSON} (build one with `dist-runtime build`)")
        try:
            meta = json.loads(meta_file.read_text())
            version = meta["format_version"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EngineError(f"{meta_file}: unreadable ({e})") from e
        if version != FORMAT_VERSION:
            raise EngineError(f"{meta_file}: format version {version}, this runtime reads version "
                              f"{FORMAT_VERSION}; rebuild the engine")
        if meta.get("checksum") != _checksum(meta):
            raise EngineError(f"{meta_file}: its content does not match its checksum (edited or corrupt); "
                              f"rebuild the engine")
        try:
            tuning = None if meta["tuning"] is None else TuningRecord.from_dict(meta["tuning"])
            engine = cls(path, ModelConfig.from_dict(meta["model_config"]), Plan.from_dict(meta["plan"]),
                         BuildRecord.from_dict(meta["build"]), meta["files"], tuning, meta["tokenizer_files"])
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{meta_file}: malformed ({e})") from e
        engine.check_tokenizer_files()
        return engine

    def serving(self, config: RuntimeConfig) -> Engine:
        """This engine with the serving limits `config` sets at start in place of the plan's."""
        plan = self.plan.with_limits(self.config.max_position_embeddings, config.max_batch_size, config.max_seq_len,
                                     config.max_num_tokens)
        return dataclasses.replace(self, plan=plan)

    def save(self) -> None:
        """Write engine.json, with the checksum of what it now holds (tuning and refit rewrite it)."""
        meta = {"format_version": FORMAT_VERSION, "model_config": self.config.to_dict(),
                "plan": self.plan.to_dict(), "build": self.build.to_dict(), "files": self.files,
                "tuning": None if self.tuning is None else self.tuning.to_dict(),
                "tokenizer_files": self.tokenizer_files}
        meta["checksum"] = _checksum(json.loads(json.dumps(meta)))  # over what load() parses back
        tmp = self.path / (ENGINE_JSON + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(self.path / ENGINE_JSON)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.plan.dtype][0]

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    def check_tokenizer_files(self) -> None:
        """The tokenizer files are those of the build: none changed, lost or added."""
        for name in sorted(set(tokenizer_files(self.path)) | set(self.tokenizer_files)):
            file, expected = self.path / name, self.tokenizer_files.get(name)
            if not file.is_file():
                if expected is not None:
                    raise EngineError(f"{file}: missing ({ENGINE_JSON} lists it); rebuild the engine")
            elif expected is None:
                raise EngineError(f"{file}: not part of the build ({ENGINE_JSON} has no checksum for it); "
                                  f"rebuild the engine")
            elif sha256_of(file) != expected:
                raise EngineError(f"{file}: corrupt (sha256 differs from {ENGINE_JSON}); rebuild the engine")

    def rank_path(self, rank: int) -> Path:
        return self.path / rank_file_name(rank)

    def load_rank_weights(self, rank: int, device: str | torch.device = "cpu",
                          verify: bool = True) -> dict[str, torch.Tensor]:
        """This rank's tensors only; with `verify`, its sha256 must match engine.json."""
        file = self.rank_path(rank)
        entry = self.files.get(file.name)
        if entry is None or not file.is_file():
            raise EngineError(f"{file}: missing (the engine has {len(self.files)} rank files)")
        if file.stat().st_size != entry["bytes"] or (verify and sha256_of(file) != entry["sha256"]):
            raise EngineError(f"{file}: corrupt (size or sha256 differs from {ENGINE_JSON}); rebuild the engine")
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors has its own error types
            raise EngineError(f"{file}: unreadable ({e})") from e


def sha256_of(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _checksum(meta: dict[str, Any]) -> str:
    """sha256 of engine.json's content but the checksum itself, as canonical JSON: the layout
    of the file (indentation, key order) does not count, every value does."""
    content = {key: value for key, value in meta.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
