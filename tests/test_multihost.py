"""Two hosts made on one machine: two network namespaces joined by a veth pair, each with an
address of its own and no other way out. Ranks 0-1 run on "host A", ranks 2-3 on "host B";
they meet at host A's address, and give the same tokens as one host does."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import uuid

import pytest
from conftest import PROMPTS, cli, json_lines, tool

from dist_runtime.rank_info import RankInfo
from launch.local import free_port
from launch.rank_info import spawned_env

HOST_A, HOST_B = "10.77.0.1", "10.77.0.2"
GREEDY = ["--temperature", "0", "--max-tokens", "8", "--json", *[a for p in PROMPTS for a in ("--prompt", p)]]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def veth_bytes(ns: str, dev: str) -> int:
    stats = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/rx_bytes"],
                           capture_output=True, text=True, check=True)
    return int(stats.stdout)


@pytest.fixture
def two_hosts():
    """(namespace A, namespace B), linked A <-> B only; removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    tag = uuid.uuid4().hex[:6]
    a, b = f"dr-a-{tag}", f"dr-b-{tag}"
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
    try:
        ip("link", "add", f"va-{tag}", "type", "veth", "peer", "name", f"vb-{tag}")
        for ns, dev, addr in ((a, f"va-{tag}", HOST_A), (b, f"vb-{tag}", HOST_B)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield (a, f"va-{tag}"), (b, f"vb-{tag}")
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
def test_tp2_pp2_split_over_two_hosts_gives_the_single_host_tokens(engines, two_hosts):
    engine = str(engines("llama", 2, 2))
    (ns_a, dev_a), (ns_b, dev_b) = two_hosts
    port, secret = free_port(), secrets.token_hex(16)
    procs = []
    for rank in range(4):
        ns = ns_a if rank < 2 else ns_b
        info = RankInfo(rank, 4, rank % 2, 2, node_id=rank // 2, master_addr=HOST_A, master_port=port, secret=secret)
        env = [f"{k}={v}" for k, v in spawned_env(info).items()]
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "env", *env, tool("dist-runtime"), "generate",
                                       engine, *GREEDY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-2000:] for _, err in outs]
    split = json_lines(subprocess.CompletedProcess([], 0, outs[0][0], outs[0][1]))
    single = json_lines(cli("generate", engine, *GREEDY))
    assert [r["token_ids"] for r in split] == [r["token_ids"] for r in single]
    # The ranks on B could reach A only over the pair: its traffic is what crossed.
    assert veth_bytes(ns_a, dev_a) > 10_000 and veth_bytes(ns_b, dev_b) > 10_000
