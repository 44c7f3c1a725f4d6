"""One RuntimeConfig per job: built from --config FILE with the flags given over it, or from
LLM's keywords; every default is the dataclass's; a key it does not know or a value of the
wrong kind is refused by name; every rank runs with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import cli, json_lines, mpirun

from dist_runtime import LLM
from dist_runtime.cli import _runtime_config, parser
from dist_runtime.errors import ConfigError
from dist_runtime.runtime_config import RuntimeConfig

GREEDY = ["--prompt", "hello", "--max-tokens", "6", "--temperature", "0", "--json"]


def _from_command_line(*argv: str) -> RuntimeConfig:
    args = parser().parse_args(list(argv))
    return _runtime_config(args, args.model)


def test_flags_override_the_config_file_and_what_neither_gives_is_the_dataclass_default(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("engine_dir: eng/\nkv_cache_fraction: 0.5\nrank_timeout_s: 60\noverlap: false\n")
    config = _from_command_line("serve", "--config", str(path), "--rank-timeout", "90", "--device", "cuda")
    assert config == RuntimeConfig("eng/", device="cuda", kv_cache_fraction=0.5, rank_timeout_s=90, overlap=False)
    assert _from_command_line("generate", "other/", "--config", str(path)).engine_dir == "other/"
    assert _from_command_line("bench", "eng/") == RuntimeConfig("eng/")


@pytest.mark.slow
@pytest.mark.parametrize("text,error", [
    ("engine_dir: eng/\ncache_fraction: 0.5\n", "unknown keys cache_fraction"),
    ("engine_dir: eng/\nverify: 'no'\n", "verify must be true or false, got 'no'"),
    ("engine_dir: eng/\nkv_cache_fraction: 1.5\n", r"kv_cache_fraction must be in \(0, 1\], got 1.5"),
    ("device: cuda\n", r"no engine folder given \(engine_dir\)"),
    ("- eng/\n", "expected a mapping"),
    ("device: [\n", "not YAML"),
])
def test_a_bad_config_file_is_one_error_line_that_names_what_is_wrong(tmp_path, text, error):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        RuntimeConfig.from_file(str(path))
    proc = cli("generate", "--config", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(f"^error: .*{error}", proc.stderr, re.M), proc.stderr


def test_llm_keywords_are_the_config_fields_and_an_unknown_one_is_named(engines):
    with pytest.raises(ConfigError, match="unknown keys kv_fraction"):
        LLM(str(engines("llama", 1, 1)), kv_fraction=0.5)


def test_the_config_reaches_a_rank_as_json_unchanged():
    config = RuntimeConfig("eng/", device="cuda:1", verify=False, num_kv_blocks=64, launcher="ray",
                           ray_address="auto")
    assert RuntimeConfig.from_json(config.to_json()) == config


def test_the_readme_config_file_is_valid(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    path = tmp_path / "serve.yaml"
    path.write_text(re.search(r"```yaml\n(.*?)```", readme, re.S)[1])
    assert RuntimeConfig.from_file(str(path)).engine_dir == "eng/"


@pytest.mark.slow
def test_generate_with_the_engine_in_the_config_file_gives_the_same_tokens_spawned_or_under_mpirun(
        engines, tmp_path):
    engine = str(engines("llama", 2, 1))
    path = tmp_path / "run.yaml"
    path.write_text(f"engine_dir: {engine}\nrank_timeout_s: 20\n")
    expected = json_lines(cli("generate", engine, *GREEDY))
    assert json_lines(cli("generate", "--config", str(path), *GREEDY)) == expected
    assert json_lines(mpirun(2, "generate", "--config", str(path), *GREEDY)) == expected
