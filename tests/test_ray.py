"""Ranks as Ray actors on a real local Ray head: the same tokens as mpirun, a clear error when the
cluster is too small, and nothing of ours left on the cluster afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import PROMPTS, cli, json_lines, mpirun, tool, wait_healthy

from launch.local import free_port

pytest.importorskip("ray", reason="the Ray launcher needs ray (pip install -e '.[test]')")

CPUS = 4
GREEDY = ["--temperature", "0", "--max-tokens", "8", "--json", *[a for p in PROMPTS for a in ("--prompt", p)]]


@pytest.fixture(scope="module")
def ray_head():
    """HOST:PORT of a one-node Ray cluster with 4 CPUs, stopped at the end whatever happens."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.monotonic()
    proc = subprocess.run([tool("ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                           "--num-cpus", str(CPUS), "--include-dashboard", "false", "--temp-dir", temp_dir],
                          capture_output=True, text=True, timeout=180, env=env)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print(f"ray head up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([tool("ray"), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _our_actors() -> list[int]:
    """Pids of RankActor processes (Ray titles them ray::RankActor, ray::RankActor.run while running)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(pid) for pid, _, args in (line.strip().partition(" ") for line in out.splitlines())
            if args.startswith("ray::RankActor")]


def _free_cpus(address: str) -> float:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(ray.available_resources().get('CPU', 0))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.split()[-1])


def _assert_nothing_left(address: str) -> None:
    """No actor process of ours, and every CPU free again (the placement group is gone)."""
    deadline = time.monotonic() + 60
    while (_our_actors() or _free_cpus(address) != CPUS) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _our_actors()
    assert _free_cpus(address) == CPUS


def test_ranks_on_a_node_get_local_ranks_in_rank_order():
    from launch.ray import node_local_ranks

    assert node_local_ranks(["a", "b", "a", "b", "b"]) == [(0, 2, 0), (0, 3, 1), (1, 2, 0), (1, 3, 1), (2, 3, 1)]


@pytest.mark.slow
def test_ray_actor_ranks_give_the_same_tokens_as_mpirun(engines, ray_head):
    engine = str(engines("llama", 2, 2))
    started = time.monotonic()
    on_ray = json_lines(cli("generate", engine, "--launcher", "ray", "--ray-address", ray_head, *GREEDY,
                            timeout=600))
    print(f"generate on Ray took {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert len(on_ray) == len(PROMPTS) and all(o["token_ids"] for o in on_ray)
    assert on_ray == json_lines(mpirun(4, "generate", engine, *GREEDY, timeout=600))
    _assert_nothing_left(ray_head)


@pytest.mark.slow
def test_more_ranks_than_the_cluster_has_cpus_is_a_clear_error(engines, ray_head):
    engine = str(engines("llama", 4, 2))  # 8 ranks on 4 CPUs
    env = {**os.environ, "DIST_RUNTIME_RAY_TIMEOUT_S": "2"}
    started = time.monotonic()
    proc = subprocess.run([tool("dist-runtime"), "generate", engine, "--launcher", "ray", "--ray-address", ray_head,
                           "--prompt", "hi"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "Ray could not place 8 ranks" in proc.stderr
    assert "8 CPU needed, the cluster has 4 (4 free)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 240
    _assert_nothing_left(ray_head)


@pytest.mark.slow
def test_a_lost_actor_ends_the_job_instead_of_hanging(engines, ray_head):
    # 500 tokens on 4 ranks take several seconds: still running when the actor is killed
    proc = subprocess.Popen([tool("dist-runtime"), "generate", str(engines("llama", 2, 2, max_seq_len=512)),
                             "--launcher", "ray", "--ray-address", ray_head, "--prompt", "hi", "--max-tokens", "500",
                             "--ignore-eos"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(actors := _our_actors()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(actors) == 3
        time.sleep(2)  # let them join and start generating
        assert proc.poll() is None
        os.kill(actors[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "lost" in err, err
    _assert_nothing_left(ray_head)


@pytest.mark.slow
def test_serve_on_ray_actors_stops_cleanly_on_sigterm(engines, ray_head):
    """Ray installs its own SIGTERM handler in the driver; the server's graceful stop still wins."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([tool("dist-runtime"), "serve", str(engines("llama", 2, 2)), "--port", str(port),
                             "--model-name", "x", "--launcher", "ray", "--ray-address", ray_head],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": "x", "prompt": "hi", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_nothing_left(ray_head)
