"""RankInfo from launcher variables, with environments as Slurm 22.05 and MPICH set them on our cluster."""

from __future__ import annotations

import shutil

import pytest

from dist_runtime.comm.auth import AuthError
from dist_runtime.rank_info import RankInfo
from launch.rank_info import ENV_SECRET, from_environment, slurm_port, tasks_per_node

# What `sbatch -n 4` gives its script, and what `srun` inside it adds for task 1 (trimmed to what matters),
# with the job's secret that run_ranks exports.
BATCH = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm", "SLURM_NODELIST": "vm", "SLURM_NTASKS": "4",
         "SLURM_NPROCS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
         "SLURM_TASKS_PER_NODE": "4"}
SRUN = BATCH | {"SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
                "SLURM_STEP_NODELIST": "vm", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "4",
                ENV_SECRET: "s3cret"}
NO_SECRET = {name: value for name, value in SRUN.items() if name != ENV_SECRET}


def test_srun_task_meets_the_others_over_tcp_at_the_first_node():
    assert from_environment(SRUN) == RankInfo(1, 4, 1, 4, 0, "vm", slurm_port(7, 0), "tcp", "s3cret")


def test_srun_task_takes_the_job_secret_that_the_batch_script_exported(tmp_path):
    assert from_environment(SRUN).secret == "s3cret"
    path = tmp_path / "secret"
    path.write_text("from-a-file\n")
    path.chmod(0o600)
    assert from_environment(NO_SECRET | {"DIST_RUNTIME_JOB_SECRET_FILE": str(path)}).secret == "from-a-file"
    with pytest.raises(AuthError, match=f"rank 1 has none: export {ENV_SECRET} "):
        from_environment(NO_SECRET)
    alone = NO_SECRET | {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1"}
    assert from_environment(alone).secret == ""  # a rank alone meets no other


def test_batch_script_salloc_shell_and_special_steps_are_not_ranks():
    assert from_environment(BATCH) is None
    for special in ("4294967290", "4294967291", "4294967292"):  # interactive, batch, extern
        assert from_environment(BATCH | {"SLURM_STEP_ID": special}) is None


def test_mpirun_inside_an_allocation_is_mpi_not_the_srun_task_that_hosts_it():
    # MPICH's mpirun starts one proxy per node with srun: every rank carries the proxy's SLURM_PROCID 0.
    env = SRUN | {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "PMI_RANK": "1", "PMI_SIZE": "2",
                  "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    assert from_environment(env) == RankInfo(1, 2, 1, 2, transport="mpi")


def test_srun_mpi_pmi2_takes_the_node_local_rank_from_slurm():
    env = SRUN | {"PMI_RANK": "1", "PMI_SIZE": "4"}  # srun --mpi=pmi2 gives no MPI_LOCALRANKID
    assert from_environment(env) == RankInfo(1, 4, 1, 4, transport="mpi")


def test_second_node_of_two_knows_its_node_and_local_world():
    env = SRUN | {"SLURM_JOB_NODELIST": "gpu03,gpu04", "SLURM_STEP_NODELIST": "gpu03,gpu04", "SLURM_PROCID": "3",
                  "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    info = from_environment(env)
    assert (info.rank, info.local_rank, info.local_world_size, info.node_id) == (3, 1, 2, 1)
    assert info.master_addr == "gpu03"


def test_a_step_on_part_of_the_job_meets_at_its_own_first_node():
    env = SRUN | {"SLURM_JOB_NODELIST": "a1,b1", "SLURM_STEP_NODELIST": "b1", "SLURM_STEP_NUM_TASKS": "2",
                  "SLURM_STEP_TASKS_PER_NODE": "2"}
    info = from_environment(env)
    assert (info.world_size, info.local_world_size, info.master_addr) == (2, 2, "b1")


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="expanding gpu[03-04] needs Slurm's scontrol")
def test_compressed_node_list_is_expanded_by_scontrol():
    env = SRUN | {"SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_STEP_NODELIST": "gpu[03-04]"}
    assert from_environment(env).master_addr == "gpu03"


def test_steps_of_one_job_meet_on_different_ports_unless_told():
    ports = {from_environment(SRUN | {"SLURM_STEP_ID": str(s)}).master_port for s in range(16)}
    assert len(ports) == 16 and all(20000 <= p < 30000 for p in ports)
    told = from_environment(SRUN | {"DIST_RUNTIME_MASTER_PORT": "29500", "DIST_RUNTIME_MASTER_ADDR": "10.0.0.1"})
    assert (told.master_addr, told.master_port) == ("10.0.0.1", 29500)


def test_tasks_per_node_lists_in_slurms_compressed_form():
    assert tasks_per_node("4") == [4]
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("3,1") == [3, 1]
    with pytest.raises(ValueError, match="unreadable Slurm tasks-per-node list '2x3'"):
        tasks_per_node("2x3")
