"""Both CPU communicators between real ranks (MPI under mpirun, gloo and sockets over TCP):
collectives over TP groups (small and large; all-to-all of uneven parts), stage-to-stage
tensors, sampled ids received without waiting, and control messages, in float32 and bfloat16."""

import os
import secrets
import subprocess
import sys
import textwrap

import pytest
from conftest import tool

from dist_runtime.rank_info import RankInfo
from launch.local import free_port
from launch.rank_info import spawned_env

PROGRAM = textwrap.dedent("""
    import torch
    from dist_runtime.mapping import Mapping
    from dist_runtime.world import open_communicator
    from launch.rank_info import from_environment

    info = from_environment()
    rank = info.rank
    comm = open_communicator(info, Mapping(tp=2, pp=2, rank=rank))
    print(type(comm).__name__, flush=True) if rank == 0 else None
    m = comm.mapping
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.full((3, 4), float(rank + 1), dtype=dtype)
        comm.all_reduce(x)
        assert x.eq(sum(r + 1 for r in m.tp_group())).all(), (rank, x)
        g = comm.all_gather(torch.full((2, 3), float(rank), dtype=dtype))
        assert g.shape == (2, 6) and g[:, :3].eq(m.tp_group()[0]).all() and g[:, 3:].eq(m.tp_group()[1]).all()
        big = torch.full((600, 1024), float(rank + 1), dtype=dtype)  # past the size that takes sockets over TCP
        assert comm.all_reduce(big).eq(sum(r + 1 for r in m.tp_group())).all(), rank
        big = torch.full((600, 1024), float(rank + 1), dtype=dtype)
        assert comm.all_gather(big)[:, 1024:].eq(m.tp_group()[1] + 1).all(), rank
        assert comm.all_reduce(torch.empty(0, 4, dtype=dtype)).shape == (0, 4)
        rows = [[1, 0], [2, 3]]  # TP rank i sends TP rank j rows[i][j] rows (none, too)
        me = m.tp_rank
        send = [torch.full((rows[me][j], 3), float(10 * rank + j), dtype=dtype) for j in range(2)]
        got = comm.all_to_all(send, [torch.empty(rows[i][me], 3, dtype=dtype) for i in range(2)])
        assert all(part.shape == (rows[i][me], 3) and part.eq(10 * m.tp_group()[i] + me).all()
                   for i, part in enumerate(got)), (rank, got)
        if m.is_first_stage:
            comm.send(torch.arange(5, dtype=dtype) + rank, m.next_stage_rank())
        else:
            got = comm.recv(torch.empty(5, dtype=dtype), m.prev_stage_rank())
            assert got.equal(torch.arange(5, dtype=dtype) + m.prev_stage_rank())
    if rank == m.sampler_rank():  # sampled ids back to rank 0, which posts both receives before waiting
        for i in range(2):
            comm.send(torch.full((3,), i, dtype=torch.int64), 0)
    if rank == 0:
        ids = [torch.empty(3, dtype=torch.int64) for _ in range(2)]
        waits = [comm.recv_async(t, m.sampler_rank()) for t in ids]
        for wait in waits:
            wait()
        assert ids[0].eq(0).all() and ids[1].eq(1).all(), ids
    for message in ({"tokens": [1, 2, 3]}, list(range(50_000))):  # one buffer, then two
        assert comm.broadcast_object(message if rank == 0 else None) == message
    gathered = comm.gather_object(f"rank {rank} ok")
    assert gathered == ([f"rank {r} ok" for r in range(4)] if rank == 0 else None)
    if rank == 0:
        print("all ranks ok")
""")


def _spawn_tcp(script) -> subprocess.CompletedProcess:
    port, secret = free_port(), secrets.token_hex(16)
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **spawned_env(RankInfo(r, 4, master_port=port,
                                                                                   secret=secret))})
             for r in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    code = max(p.returncode for p in procs)
    return subprocess.CompletedProcess([], code, outs[0][0], "".join(err for _, err in outs))


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["mpi", "tcp"])
def test_communicator_collectives_point_to_point_and_control_plane(transport, tmp_path):
    script = tmp_path / "comm.py"
    script.write_text(PROGRAM)
    if transport == "mpi":
        proc = subprocess.run([tool("mpirun"), "-np", "4", sys.executable, str(script)], capture_output=True,
                              text=True, timeout=120)
    else:
        proc = _spawn_tcp(script)
    assert proc.returncode == 0, proc.stderr
    expected = {"mpi": "MpiCommunicator", "tcp": "GlooCommunicator"}[transport]
    assert proc.stdout.split() == [expected, "all", "ranks", "ok"]
