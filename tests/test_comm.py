"""The MPI communicator between real ranks: collectives over TP groups, stage-to-stage
tensors and control messages, in float32 and bfloat16."""

import subprocess
import sys
import textwrap

from conftest import tool

PROGRAM = textwrap.dedent("""
    import torch
    from mpi4py import MPI
    from dist_runtime.comm.mpi import MpiCommunicator
    from dist_runtime.mapping import Mapping

    rank = MPI.COMM_WORLD.rank
    comm = MpiCommunicator(Mapping(tp=2, pp=2, rank=rank))
    m = comm.mapping
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.full((3, 4), float(rank + 1), dtype=dtype)
        comm.all_reduce(x)
        assert x.eq(sum(r + 1 for r in m.tp_group())).all(), (rank, x)
        g = comm.all_gather(torch.full((2, 3), float(rank), dtype=dtype))
        assert g.shape == (2, 6) and g[:, :3].eq(m.tp_group()[0]).all() and g[:, 3:].eq(m.tp_group()[1]).all()
        if m.is_first_stage:
            comm.send(torch.arange(5, dtype=dtype) + rank, m.next_stage_rank())
        else:
            got = comm.recv(torch.empty(5, dtype=dtype), m.prev_stage_rank())
            assert got.equal(torch.arange(5, dtype=dtype) + m.prev_stage_rank())
    step = comm.broadcast_object({"tokens": [1, 2, 3]} if rank == 0 else None)
    assert step == {"tokens": [1, 2, 3]}
    gathered = comm.gather_object(f"rank {rank} ok")
    assert gathered == ([f"rank {r} ok" for r in range(4)] if rank == 0 else None)
    if rank == 0:
        print("all ranks ok")
""")


def test_mpi_communicator_collectives_point_to_point_and_control_plane(tmp_path):
    script = tmp_path / "comm.py"
    script.write_text(PROGRAM)
    proc = subprocess.run([tool("mpirun"), "-np", "4", sys.executable, str(script)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "all ranks ok"
