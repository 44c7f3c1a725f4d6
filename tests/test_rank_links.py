"""The sockets between ranks admit only the job's own ranks: a stranger on this host that
connects to rank 0's heartbeat port, its control channel or its rendezvous store is dropped
and logged, is never unpickled, reads and sets nothing, and the job serves on. A one-host job
listens on loopback alone; the job's secret comes from the launcher."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pickle
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import mpirun_command, tool, wait_healthy

from dist_runtime.comm.auth import AuthError, dial
from dist_runtime.comm.channel import Channel
from dist_runtime.comm.store import RendezvousStore
from dist_runtime.rank_info import RankInfo
from launch.local import free_port
from launch.rank_info import ENV_SECRET, ENV_SECRET_FILE, SecretError, from_environment, spawned_env

GREEDY = {"model": "tiny", "prompt": "Hello, world!", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # 32-bit words in host order
    return str(ipaddress.ip_address(raw))


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((_address(address), int(port, 16)))
    return found


def until_closed(sock: socket.socket) -> bytes:
    """What the peer sends until it drops the connection."""
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:  # dropped with our bytes unread
        pass
    return got


def environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)


def listens_at(log: Path, what: str, timeout: float = 30) -> tuple[str, int]:
    """The address rank 0 logged for its `what` (DIST_RUNTIME_LOG=info)."""
    deadline = time.monotonic() + timeout
    while not (m := re.search(rf"\[rank 0\].*the {what} listens at ([\d.]+):(\d+)", log.read_text())):
        assert time.monotonic() < deadline, f"rank 0 did not log its {what}: {log.read_text()[-2000:]}"
        time.sleep(0.1)
    return m[1], int(m[2])


class Served:
    """`dist-runtime serve` on a tp=2 engine (rank 0 and one spawned rank), its log in a file."""

    def __init__(self, engine: Path, log: Path) -> None:
        self.log = log
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        with open(log, "w") as err:
            self.proc = subprocess.Popen([tool("dist-runtime"), "serve", str(engine), "--port", str(port),
                                          "--model-name", "tiny"], stderr=err,
                                         env={**os.environ, "DIST_RUNTIME_LOG": "info"})
        wait_healthy(self.proc, self.url)
        self.worker = next(c for c in children(self.proc.pid) if "DIST_RUNTIME_RANK" in environ(c))

    def greedy_tokens(self) -> list[int]:
        reply = httpx.post(self.url + "/v1/completions", json=GREEDY | {"logprobs": 0}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["logprobs"]["tokens"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def served(engines, tmp_path_factory):
    server = Served(engines("llama", 2, 1), tmp_path_factory.mktemp("served") / "serve.log")
    yield server
    if server.proc.poll() is None:
        server.stop()


@pytest.mark.slow
def test_strangers_on_the_heartbeat_port_do_not_stop_the_job(served):
    before = served.greedy_tokens()
    host, port = listens_at(served.log, "liveness monitor")
    with socket.create_connection((host, port)) as silent:  # says nothing while the others come and go
        for greeting in (b"1\n", b"1\n0.0\n", os.urandom(64)):
            with socket.create_connection((host, port)) as stranger:
                stranger.sendall(greeting)  # "1\n" and a close must not stop the job ("rank 1 lost")
        with pytest.raises(AuthError):
            dial((host, port), "not the job's secret")
        time.sleep(1.5)  # several heartbeats
        assert served.greedy_tokens() == before
        assert silent.fileno() >= 0
    assert httpx.get(served.url + "/health", timeout=5).status_code == 200
    log = served.log.read_text()
    assert "rank 1 lost" not in log
    assert log.count("dropped a connection to the liveness monitor from 127.0.0.1:") >= 4, log[-3000:]


def test_a_stranger_cannot_read_or_set_keys_in_the_rendezvous_store(served):
    port = int(environ(served.worker)["DIST_RUNTIME_MASTER_PORT"])
    for op in ([b"set", b"evil", b"1"], [b"get", b"control-channel", b"1000"]):  # the store's own framing
        body = b"".join(struct.pack("!Q", len(part)) + part for part in op)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as stranger:
            stranger.sendall(struct.pack("!Q", len(body)) + body + b"\0" * 64)
            assert len(until_closed(stranger)) == 32  # the listener's nonce, then the close; no value
    with pytest.raises(AuthError):
        dial(("127.0.0.1", port), "a guess")
    secret = environ(served.worker)[ENV_SECRET]
    store = RendezvousStore("127.0.0.1", port, secret, serve=False, timeout=datetime.timedelta(seconds=10))
    try:
        assert not store.check(["evil"])
        assert store.get("control-channel").startswith(b"127.0.0.1:")  # the job's own ranks still can
    finally:
        store.close()
    assert served.greedy_tokens()
    assert "dropped a connection to the rendezvous store from 127.0.0.1:" in served.log.read_text()


def test_a_one_host_job_listens_on_loopback_alone(served):
    ports = {pid: listening(pid) for pid in (served.proc.pid, served.worker)}
    assert ports[served.proc.pid] and ports[served.worker], ports  # rank 0: HTTP, store, monitor; rank 1: gloo
    assert {address for found in ports.values() for address, _ in found} == {"127.0.0.1"}, ports
    assert ("127.0.0.1", int(environ(served.worker)["DIST_RUNTIME_MASTER_PORT"])) in ports[served.proc.pid]
    assert listens_at(served.log, "liveness monitor") in ports[served.proc.pid]


RANK_1 = textwrap.dedent("""
    import datetime, sys
    from dist_runtime.comm.channel import Channel
    from dist_runtime.comm.store import RendezvousStore

    port, secret = int(sys.argv[1]), sys.argv[2]
    store = RendezvousStore("127.0.0.1", port, secret, serve=False, timeout=datetime.timedelta(seconds=30))
    channel = Channel(1, 2, store, "127.0.0.1", secret)
    print(channel.broadcast_object(None), flush=True)
    channel.close()
    store.close()
""")


class Marker:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickle_sent_to_the_control_channel_at_start_up_is_never_loaded(tmp_path, caplog):
    marker = tmp_path / "unpickled"
    port, secret = free_port(), secrets.token_hex(16)
    store = RendezvousStore("127.0.0.1", port, secret, serve=True, timeout=datetime.timedelta(seconds=30))
    result = {}
    rank0 = threading.Thread(target=lambda: result.update(channel=Channel(0, 2, store, "127.0.0.1", secret)),
                             daemon=True)
    rank0.start()
    try:
        peek = RendezvousStore("127.0.0.1", port, secret, serve=False, timeout=datetime.timedelta(seconds=30))
        host, channel_port = peek.get("control-channel").decode().rsplit(":", 1)  # where rank 1 will dial
        peek.close()
        for message in (pickle.dumps(Marker(marker)), pickle.dumps(1)):  # a pickle; a pickled rank, as before
            with socket.create_connection((host, int(channel_port)), timeout=15) as stranger:
                stranger.sendall(struct.pack("!Q", len(message)) + message + b"\0" * 64)
                until_closed(stranger)
        rank1 = subprocess.Popen([sys.executable, "-c", RANK_1, str(port), secret], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        rank0.join(30)
        channel = result["channel"]
        assert channel.broadcast_object("started") == "started"
        out, err = rank1.communicate(timeout=60)
    finally:
        store.close()
    assert rank1.returncode == 0 and out.split() == ["started"], err
    assert not marker.exists()
    assert len(channel.socks) == 1
    channel.close()
    dropped = [m for m in caplog.messages if m.startswith("dropped a connection to the control channel from 127.")]
    assert len(dropped) == 2, caplog.messages


def test_under_mpirun_on_one_host_the_monitor_listens_on_loopback(engines, tmp_path):
    log = tmp_path / "mpi.log"
    with open(log, "w") as err:
        proc = subprocess.run([*mpirun_command(2), tool("dist-runtime"), "generate", str(engines("llama", 2, 1)),
                               "--prompt", "hi", "--max-tokens", "2", "--temperature", "0"], stderr=err,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "DIST_RUNTIME_LOG": "info"},
                              timeout=120)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert listens_at(log, "liveness monitor", timeout=0)[0] == "127.0.0.1"


def _spawned_env(**extra: str) -> dict[str, str]:
    return spawned_env(RankInfo(1, 2, master_port=29500, transport="tcp")) | extra


def test_a_secret_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_text("s3cret\n")
    path.chmod(0o644)
    with pytest.raises(SecretError, match=rf"{ENV_SECRET_FILE}={path} is open to other users \(mode 0644\); "
                                          rf"make it readable by you alone: chmod 600 {path}"):
        from_environment(_spawned_env(**{ENV_SECRET_FILE: str(path)}))
    path.chmod(0o600)
    assert from_environment(_spawned_env(**{ENV_SECRET_FILE: str(path)})).secret == "s3cret"


def test_the_secret_never_shows_in_a_rank_info():
    info = from_environment(_spawned_env(**{ENV_SECRET: "s3cret"}))
    assert info.secret == "s3cret" and "s3cret" not in repr(info)


def test_a_slurm_job_without_a_secret_fails_naming_the_variable(engines):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIST_RUNTIME_")} | {
        "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
        "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2"}
    proc = subprocess.run([tool("dist-runtime"), "generate", str(engines("llama", 2, 1)), "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "error: ranks that meet over TCP need the job's secret" in proc.stderr and ENV_SECRET in proc.stderr
