"""The sbatch templates on a real one-node Slurm cluster (`.ci/slurm-up` starts one): a generate
job gives the tokens of a local run, and an allocation that does not fit the engine fails before
any rank starts. Skipped where no cluster answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, PROMPTS, cli, json_lines

SLURM = Path(__file__).resolve().parent.parent / "slurm"
GREEDY = ["--temperature", "0", "--max-tokens", "8", "--json", *[a for p in PROMPTS for a in ("--prompt", p)]]


def _no_cluster() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch: `.ci/slurm-up` (root, apt) starts a one-node Slurm cluster"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout.split()
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s: slurmctld is not running"
    if not {"idle", "mix", "alloc"} & set(states):
        return f"no Slurm node is up (sinfo states: {states or 'none'}); run .ci/slurm-up"
    return None


NO_CLUSTER = _no_cluster()
pytestmark = pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or "")


def sbatch(tmp_path: Path, template: str, *args: str, options: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """Submit a template and wait for the job: (exit code, its stdout, its stderr). --time makes Slurm
    end a job that hangs; jobs inherit this environment, with this venv's tools first on PATH."""
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sbatch", "--wait", "--export=ALL", "--time=10", f"--output={out}", f"--error={err}",
                           *options, str(SLURM / template), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.stdout.startswith("Submitted batch job"), proc.stderr
    return proc.returncode, out.read_text(), err.read_text()


def processes_of(engine: str) -> list[str]:
    """Ranks (dist-runtime or launch.worker) still running on this engine, after a few seconds' grace."""
    for _ in range(10):
        ps = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout.splitlines()
        left = [p for p in ps if engine in p and ("dist-runtime" in p or "launch.worker" in p)]
        if not left:
            return []
        time.sleep(1)
    return left


@pytest.mark.slow
def test_generate_job_gives_the_tokens_of_a_local_run(engines, tmp_path):
    engine = str(engines("llama", 2, 2))
    code, out, err = sbatch(tmp_path, "generate.sbatch", engine, *GREEDY)
    assert code == 0, err
    assert "4 ranks, tp=2 x pp=2" in err
    local = json_lines(cli("generate", engine, *GREEDY, timeout=600))
    job = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(o["prompt"], o["token_ids"]) for o in job] == [(o["prompt"], o["token_ids"]) for o in local]
    assert processes_of(engine) == []


def test_allocation_that_does_not_fit_the_engine_fails_before_ranks_start(engines, tmp_path):
    engine = str(engines("llama", 2, 2))
    start = time.monotonic()
    code, out, err = sbatch(tmp_path, "generate.sbatch", engine, "--prompt", "hi", options=("--ntasks-per-node=2",))
    assert code != 0 and out == ""
    assert f"engine {engine} needs 4 ranks (tp=2 x pp=2); this allocation has 2 tasks" in err
    assert "--nodes=1 --ntasks-per-node=4, or --nodes=2 --ntasks-per-node=2" in err
    assert "Traceback" not in err and time.monotonic() - start < 60
    assert processes_of(engine) == []


def test_job_without_an_engine_says_what_to_give(tmp_path):
    code, _, err = sbatch(tmp_path, "bench.sbatch")
    assert code != 0
    assert "give the engine folder: sbatch slurm/bench.sbatch ENGINE [ARGS...]" in err
