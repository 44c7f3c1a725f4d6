"""Faults, with real processes: a rank killed with SIGKILL or frozen mid-request is named in
the error every client gets, every process of the job exits non-zero, and nothing is left
behind; SIGTERM and Ctrl-C on rank 0 drain the server, then stop every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import mpirun_command, tool, wait_healthy

from launch.local import free_port

LONG = dict(max_batch_size=8, max_seq_len=512)  # room for a request that runs for seconds
STARTED: set[int] = set()  # every rank process these tests saw: none may outlive them


def ranks_of(pid: int) -> dict[int, int]:
    """rank -> pid of the processes rank 0 (pid) spawned."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    out = {}
    for child in map(int, children):
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=")[1]) for e in env if e.startswith(b"DIST_RUNTIME_RANK=")), None)
        if rank is not None:
            out[rank] = child
    STARTED.update(out.values(), [pid])
    return out


def mpi_ranks(needle: str) -> dict[int, int]:
    """rank -> pid of the MPI ranks whose command line holds `needle`."""
    out = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle.encode() in (entry / "cmdline").read_bytes():
                env = dict(e.split(b"=", 1) for e in (entry / "environ").read_bytes().split(b"\0") if b"=" in e)
                if b"PMI_RANK" in env:
                    out[int(env[b"PMI_RANK"])] = int(entry.name)
        except OSError:
            continue
    STARTED.update(out.values())
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def wait_gone(pids, timeout: float) -> float:
    start = time.monotonic()
    while any(alive(p) for p in pids):
        assert time.monotonic() - start < timeout, f"still running after {timeout} s: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)
    return time.monotonic() - start


def shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


class Serve:
    def __init__(self, engine, *args: str) -> None:
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        self.proc = subprocess.Popen([tool("dist-runtime"), "serve", str(engine), "--port", str(port),
                                      "--model-name", "tiny", *args], stderr=subprocess.PIPE, text=True)
        self.health = wait_healthy(self.proc, self.url)  # every /health status seen while waiting
        self.ranks = ranks_of(self.proc.pid)

    def stream_in_background(self) -> tuple[threading.Thread, dict]:
        """A long streaming request; returns once its first tokens have arrived."""
        result = {"events": [], "first": threading.Event()}

        def run():
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            try:
                with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            result["events"].append(line[6:])
                            result["first"].set()
            except httpx.HTTPError as e:  # the server stopped mid-stream
                result["events"].append(f"closed: {e}")
            result["ended"] = time.monotonic()
            result["first"].set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert result["first"].wait(60)
        return thread, result


@pytest.fixture
def engine(engines):
    return engines("llama", 2, 2, **LONG)


@pytest.mark.slow
def test_health_says_not_ready_until_every_rank_has_loaded(engine):
    server = Serve(engine)
    try:
        assert server.health[0] == 503 and server.health[-1] == 200  # bound before loading, ready after
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGSTOP"])
def test_a_lost_rank_is_named_to_clients_and_every_process_exits(engine, how):
    before = shm()
    server = Serve(engine, "--rank-timeout", "6")
    victim = 2 if how == "kill -9" else 1
    thread, result = server.stream_in_background()
    lost_at = time.monotonic()
    os.kill(server.ranks[victim], signal.SIGKILL if how == "kill -9" else signal.SIGSTOP)
    thread.join(60)
    detected_s = result["ended"] - lost_at
    errors = [json.loads(e)["error"]["message"] for e in result["events"] if e.startswith('{"error"')]
    assert len(errors) == 1 and f"rank {victim} lost" in errors[0], result["events"][-3:]
    assert ("process ended" if how == "kill -9" else "no heartbeat") in errors[0]
    assert detected_s < (5 if how == "kill -9" else 30)
    health = httpx.get(server.url + "/health", timeout=5)  # the server lingers a moment, saying why
    assert health.status_code == 503 and f"rank {victim} lost" in health.text
    assert server.proc.wait(30) != 0
    wait_gone(server.ranks.values(), 10)
    assert shm() <= before


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_on_rank_0_of_a_server_drains_and_stops_every_rank(engine, sig):
    """The stream in flight outlasts the 1 s drain: it ends with a last event and [DONE]; then
    every rank stops. Timed generously: a loaded 2-core machine runs these 4 ranks slowly."""
    server = Serve(engine, "--drain-timeout", "1")
    thread, result = server.stream_in_background()
    server.proc.send_signal(sig)
    start = time.monotonic()
    assert server.proc.wait(20) == 0, server.proc.stderr.read()[-3000:]  # a requested stop is a clean one
    assert wait_gone(server.ranks.values(), 20 - (time.monotonic() - start)) >= 0
    thread.join(10)
    assert result["events"][-1] == "[DONE]" and "shutting down" in result["events"][-2], result["events"][-3:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_on_generate_stops_every_rank_within_10_s(engine, sig):
    proc, ranks, stderr = start_generate(engine)
    proc.send_signal(sig)
    start = time.monotonic()
    assert proc.wait(10) == 128 + sig, "".join(stderr[-30:])
    wait_gone(ranks.values(), 10 - (time.monotonic() - start))


def start_generate(engine) -> tuple[subprocess.Popen, dict[int, int], list[str]]:
    """A long `generate` on spawned ranks, a second into its steps (rank 0 has logged one);
    its stderr lines, read as they come."""
    proc = subprocess.Popen([tool("dist-runtime"), "generate", str(engine), "--max-tokens", "400", "--ignore-eos",
                             *[a for i in range(16) for a in ("--prompt", f"prompt {i}")]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DIST_RUNTIME_LOG": "debug"})
    lines, ready = [], threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("[rank 0]") and "dist_runtime.coordinator" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(60), "".join(lines)
    ranks = ranks_of(proc.pid)
    assert len(ranks) == 3, ranks
    time.sleep(1)
    return proc, ranks, lines


@pytest.mark.slow
def test_a_killed_rank_fails_generate_with_its_name(engine):
    proc, ranks, stderr = start_generate(engine)
    os.kill(ranks[2], signal.SIGKILL)
    start = time.monotonic()
    proc.wait(30)
    time.sleep(0.5)  # the reader takes the last lines
    err = "".join(stderr)
    assert proc.returncode == 1 and "error: rank 2 lost: its process ended" in err, err[-2000:]
    assert time.monotonic() - start < 10
    wait_gone(ranks.values(), 10)


@pytest.mark.slow
def test_ctrl_c_on_mpirun_stops_a_server_cleanly_within_10_s(engine):
    """mpirun hands Ctrl-C to every rank at once (as Slurm's scancel does SIGTERM): the ranks
    other than 0 leave the stop to rank 0, which ends them all cleanly."""
    port = free_port()
    with subprocess.Popen([*mpirun_command(4), tool("dist-runtime"), "serve", str(engine), "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        ranks = mpi_ranks(str(engine))
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        assert proc.wait(10) == 0
        wait_gone(ranks.values(), 10 - (time.monotonic() - start))


def test_a_killed_rank_under_mpirun_ends_the_job_with_an_error(engine):
    with subprocess.Popen([*mpirun_command(4), tool("dist-runtime"), "generate", str(engine),
                           "--max-tokens", "400", "--ignore-eos", *["--prompt", "x"] * 32],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 60
        while len(ranks := mpi_ranks(str(engine))) < 4:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(3)  # loaded and generating
        assert proc.poll() is None
        os.kill(ranks[3], signal.SIGKILL)
        assert proc.wait(30) != 0
        wait_gone(ranks.values(), 10)


def test_no_process_of_these_tests_is_left():
    if not STARTED:
        pytest.skip("checks the processes the other tests of this file started")
    assert [pid for pid in STARTED if alive(pid)] == []
