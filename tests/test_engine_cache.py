"""A model folder, or a Hub id in the local Hugging Face cache, is enough: its engine is built on
first use into the engine cache, reused on the next start, and rebuilt only when the weights or
the build options change. Serving limits are chosen at each start."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import PROMPTS, cli, json_lines, mpirun

from dist_runtime import LLM, SamplingParams
from dist_runtime.engine_cache import resolve_model
from dist_runtime.errors import ConfigError, PlanError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _generate(*args: str) -> tuple[list[list[int]], str]:
    proc = cli("generate", *args, "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--json",
               *[a for p in PROMPTS for a in ("--prompt", p)])
    return [o["token_ids"] for o in json_lines(proc)], proc.stderr


@pytest.fixture(scope="module")
def expected(engines) -> list[list[int]]:
    """The tokens of an engine built by hand with `build`."""
    with LLM(str(engines("llama", 1, 1))) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.slow
def test_a_checkpoint_folder_is_built_once_and_reused(checkpoints, expected, tmp_path):
    cache = tmp_path / "cache"
    first, said = _generate(str(checkpoints["llama"]), "--engine-cache", str(cache))
    assert first == expected
    assert "engine: building" in said and "engine: built in" in said
    [engine] = [p for p in cache.iterdir() if p.is_dir()]
    assert engine.name.startswith("llama-tp1-pp1-fp32-")
    again, said = _generate(str(checkpoints["llama"]), "--engine-cache", str(cache), "--max-seq-len", "256")
    assert again == expected
    assert f"engine: {engine} (built earlier from" in said and "building" not in said
    assert [p for p in cache.iterdir() if p.is_dir()] == [engine]  # serving limits do not rebuild


@pytest.mark.slow
def test_other_build_options_or_changed_weights_build_another_engine(checkpoints, tmp_path):
    cache = tmp_path / "cache"
    model = shutil.copytree(checkpoints["llama"], tmp_path / "model")
    with LLM(model, engine_cache=str(cache), tp=2) as llm:
        tp2 = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with LLM(model, engine_cache=str(cache), dtype="bf16") as llm:
        llm.generate(PROMPTS[:1], GREEDY)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["metadata"]["note"] = "edited"  # any byte of the checkpoint's files counts
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with LLM(model, engine_cache=str(cache), tp=2) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == tp2
    names = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir() if p.is_dir())
    assert names == ["model-tp1-pp1-bf16", "model-tp2-pp1-fp32", "model-tp2-pp1-fp32"]


def _hub_cache(root, checkpoint, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face Hub cache holding `checkpoint` as `repo_id`, laid out as the hub lays it out:
    files stored once as blobs, a snapshot per commit linking to them, refs/main naming the commit."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(p for p in checkpoint.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"blob{i:04d}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.slow
def test_a_hub_id_is_read_from_the_local_hugging_face_cache(checkpoints, expected, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snapshot = _hub_cache(hub, checkpoints["llama"], "acme/tiny-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokens, said = _generate("acme/tiny-llama", "--engine-cache", str(tmp_path / "cache"))
    assert tokens == expected
    assert f"engine: building {snapshot}" in said
    proc = cli("generate", "acme/other-model", "--engine-cache", str(tmp_path / "cache"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: acme/other-model: no such folder, and no snapshot of a Hub model 'acme/other-model' in the "
        f"Hugging Face cache ({hub})")


def test_a_folder_that_is_neither_engine_nor_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_model(str(tmp_path / "missing" / "deeper"))
    proc = cli("generate", str(tmp_path), "--engine-cache", str(tmp_path / "cache"))
    assert proc.returncode == 1
    assert f"{tmp_path}: no config.json (is this a Hugging Face checkpoint folder?)" in proc.stderr


def test_build_options_beside_an_engine_folder_must_be_its_own(engines):
    engine = engines("llama", 1, 1)
    with pytest.raises(ConfigError, match=r"tp 2: the engine .* was built with tp 1; give the checkpoint"):
        LLM(str(engine), tp=2)


@pytest.mark.slow
def test_serving_limits_are_set_at_start_up_to_the_model_positions(engines, checkpoints):
    engine = engines("llama", 1, 1)  # planned for 4 sequences of 128 tokens
    long_prompt = list(range(1, 300))
    with LLM(str(engine), max_seq_len=512, max_batch_size=8, max_num_tokens=64) as llm:
        assert llm.max_seq_len == 512
        assert llm.engine.plan.max_batch_size == 8 and llm.engine.plan.max_num_tokens == 64
        [out] = llm.generate([long_prompt], GREEDY)
        assert len(out.token_ids) == 8
    with pytest.raises(PlanError, match="max_seq_len 513 exceeds the model's 512 positions"):
        LLM(str(engine), max_seq_len=513)


@pytest.mark.slow
def test_ranks_under_mpirun_build_the_engine_once(checkpoints, expected, tmp_path):
    cache = tmp_path / "cache"
    args = ["generate", str(checkpoints["llama"]), "--tp", "2", "--engine-cache", str(cache), "--max-tokens", "8",
            "--temperature", "0", "--ignore-eos", "--json", *[a for p in PROMPTS for a in ("--prompt", p)]]
    proc = mpirun(2, *args)
    outputs = json_lines(proc)
    with LLM(checkpoints["llama"], engine_cache=str(cache), tp=2) as llm:
        assert [o["token_ids"] for o in outputs] == [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    # rank 0 says which: it built the engine, or found it built by the rank that came first
    assert proc.stderr.count("engine: building") + proc.stderr.count("(built earlier from") == 1
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1

