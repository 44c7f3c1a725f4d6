"""An engine runs only as it was built: engine.json and the tokenizer files are checked against
their checksums at load, a file that does not parse is refused by name, and the CLI says so
in one `error:` line, not a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import cli

from dist_runtime.engine import Engine, _checksum, sha256_of
from dist_runtime.errors import EngineError
from sharding.builder import build_engine


def copy(engines, tmp_path) -> Path:
    return shutil.copytree(engines("llama", 1, 1), tmp_path / "eng")  # the fixture's engines are shared


def one_error_line(engine: Path, name: str) -> str:
    proc = cli("generate", str(engine), "--prompt", "x")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and name in errors[0], proc.stderr
    return errors[0]


def test_an_edited_engine_json_is_refused_naming_it(engines, tmp_path):
    engine = copy(engines, tmp_path)
    meta = json.loads((engine / "engine.json").read_text())
    meta["model_config"]["rope_theta"] *= 2  # would run, silently, as another model
    (engine / "engine.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(EngineError, match="engine.json: its content does not match its checksum.*rebuild"):
        Engine.load(engine)
    assert "rebuild the engine" in one_error_line(engine, "engine.json")


@pytest.mark.parametrize("record", ["build", "tuning"])
def test_a_key_the_build_or_tuning_record_does_not_know_is_refused_by_name(engines, tmp_path, record):
    engine = copy(engines, tmp_path)
    meta = json.loads((engine / "engine.json").read_text())
    meta[record]["note"] = "added by hand"
    meta["checksum"] = _checksum(meta)  # as a newer build would write it
    (engine / "engine.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(EngineError, match=f"engine.json: malformed \\({record}: unknown keys note"):
        Engine.load(engine)


def test_engine_json_saved_again_or_laid_out_otherwise_still_loads(engines, tmp_path):
    engine = Engine.load(copy(engines, tmp_path))
    engine.build.refit_at = "2026-01-01T00:00:00Z"  # what tuning and refit do: change a field, save()
    engine.save()
    meta = json.loads((engine.path / "engine.json").read_text())
    (engine.path / "engine.json").write_text(json.dumps(dict(reversed(meta.items())), indent=4))
    assert Engine.load(engine.path).build.refit_at == "2026-01-01T00:00:00Z"


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def not_json(file: Path) -> None:
    file.write_text("{not json")


@pytest.mark.parametrize("name, damage", [("tokenizer.json", truncate), ("tokenizer_config.json", not_json),
                                          ("generation_config.json", not_json)])
def test_a_damaged_tokenizer_file_is_one_error_line_naming_it(engines, tmp_path, name, damage):
    built = Engine.load(copy(engines, tmp_path))
    file = built.path / name
    listed = file.is_file()
    damage(file)
    assert ("corrupt" if listed else "not part of the build") in one_error_line(built.path, name)
    # With a checksum that matches (a file broken before the build), the tokenizer names it.
    built.tokenizer_files[name] = sha256_of(file)
    built.save()
    assert "unreadable" in one_error_line(built.path, name)


def test_a_checkpoint_with_a_broken_tokenizer_file_is_refused_at_build(checkpoints, tmp_path):
    ckpt = shutil.copytree(checkpoints["llama-tied"], tmp_path / "ckpt")
    truncate(ckpt / "tokenizer.json")
    with pytest.raises(EngineError, match="tokenizer.json: unreadable"):
        build_engine(ckpt, tmp_path / "eng", progress=False)
    assert not (tmp_path / "eng").exists()
