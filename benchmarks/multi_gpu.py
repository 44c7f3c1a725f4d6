"""Tensor parallelism on several GPUs of one host, in one run: the machine's topology and NCCL
version, the all-reduce of one token's hidden state (NCCL and the one-shot kernel), greedy
tokens of TP=2 and PP=2 against TP=1, and batch-1 speed of TP=1 and TP=2 on a real-shape
checkpoint. Every step has a time limit; a step that overruns gets its stacks dumped
(SIGUSR1) into the log and the run goes on. Writes multi_gpu.json and multi_gpu.log under --out.

    python benchmarks/multi_gpu.py --out $OUT [--preset llama-3-8b] [--skip-8b]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-m", "dist_runtime.cli"]


def sh(cmd: list[str], log, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run `cmd` in its own process group; on overrun dump its stacks, then kill the group."""
    print("$", " ".join(cmd), file=log, flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = stop_hung(proc)
        err += f"\nTIMED OUT after {timeout} s"
    print(out[-4000:], err[-12000:], f"(exit {proc.returncode}, {time.time() - start:.1f} s)", file=log, flush=True)
    return proc.returncode, out


def stop_hung(proc: subprocess.Popen) -> tuple[str, str]:
    """What a hung process group was doing (process states, GPU load, Python stacks), then kill it."""
    ps = ["ps", "-o", "pid,stat,wchan:30,args", "-g", str(proc.pid)]
    gpus = ["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv"]
    seen = "".join(subprocess.run(cmd, capture_output=True, text=True).stdout for cmd in (ps, gpus))
    os.killpg(proc.pid, signal.SIGUSR1)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    return out, f"{err}\n{seen}"


def allreduce_worker() -> None:
    """One rank (started by `spawn_allreduce`): NCCL and one-shot all-reduce times per size."""
    import torch

    from dist_runtime.comm.nccl import _graph_us
    from dist_runtime.mapping import Mapping
    from dist_runtime.world import open_communicator
    from launch.rank_info import from_environment

    info = from_environment()
    comm = open_communicator(info, Mapping(tp=info.world_size, rank=info.rank), f"cuda:{info.local_rank}")
    result = {"ranks": info.world_size, "peer_access": torch.cuda.can_device_access_peer(0, 1),
              "tuning": comm.tuning, "eager_us": {}}
    for size in (8192, 1 << 20):
        x = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")
        for name, fn in (("auto", comm.all_reduce), ("nccl", comm._nccl_all_reduce)):
            for _ in range(20):
                fn(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(500):
                fn(x)
            torch.cuda.synchronize()
            result["eager_us"][f"{name}_{size}"] = (time.perf_counter() - start) / 500 * 1e6
            result[f"graph_us_{name}_{size}"] = _graph_us(fn, x, ops=200)
    x = torch.full((4096,), float(info.rank + 1), dtype=torch.bfloat16, device="cuda")
    result["sum_ok"] = bool((comm.all_reduce(x) == info.world_size * (info.world_size + 1) / 2).all())
    if info.rank == 0:
        print(json.dumps(result), flush=True)
    comm.close()


def spawn_allreduce(ranks: int, log, env: dict) -> dict | None:
    from dist_runtime.rank_info import RankInfo
    from launch.local import free_port
    from launch.rank_info import spawned_env

    port, secret = free_port(), secrets.token_hex(16)  # the ranks' shared job secret
    procs = []
    for rank in range(ranks):
        info = RankInfo(rank, ranks, rank, ranks, master_port=port, transport="tcp", secret=secret)
        procs.append(subprocess.Popen([sys.executable, __file__, "--out", "-", "--allreduce-worker"], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True, env={**os.environ, **env, **spawned_env(info)}))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            outputs.append("".join(stop_hung(proc)) + "\nTIMED OUT")
    print(f"$ all-reduce workers, env {env}", *(o[-15000:] for o in outputs), sep="\n", file=log, flush=True)
    lines = [line for line in outputs[0].splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def greedy_tokens(engine: Path, log, prompts: list[str], launcher: list[str] = ()) -> list[list[int]] | None:
    cmd = [*launcher, *CLI, "generate", str(engine), "--device", "cuda", "--temperature", "0", "--ignore-eos",
           "--max-tokens", "8", "--json", *[a for p in prompts for a in ("--prompt", p)]]
    code, out = sh(cmd, log, timeout=180)
    return [json.loads(line)["token_ids"] for line in out.splitlines() if line.startswith("{")] if code == 0 else None


def bench(engine: Path, log, extra: list[str]) -> dict | None:
    code, out = sh([*CLI, "bench", str(engine), "--device", "cuda", "--json", "--no-verify", *extra], log, 300)
    return json.loads(out) if code == 0 else None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--work", default="/tmp/dist-runtime-multi")
    p.add_argument("--skip-8b", action="store_true", help="only topology, all-reduce and tiny-model tokens")
    p.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allreduce_worker:
        allreduce_worker()
        return 0
    import torch
    from cupy.cuda import nccl

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "multi_gpu.log", "a")  # noqa: SIM115
    gpus = torch.cuda.device_count()
    results: dict = {"gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "nccl_version": nccl.get_version(),
                     "topology": subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout}

    def save() -> None:
        (out / "multi_gpu.json").write_text(json.dumps(results, indent=1))

    save()
    results["allreduce"] = spawn_allreduce(gpus, log, {"NCCL_DEBUG": "INFO"})
    save()
    tiny = work / "ckpt-tiny"
    # float32: bf16 partial sums added in another order flip the random tiny model's near-ties
    # (in bf16, TP=2 can leave TP=1's greedy tokens by the 4th token of a prompt)
    sh([*CLI, "synth", "--out", str(tiny), "--dtype", "float32"], log, 120)
    tokens = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        engine = work / f"eng-tiny-tp{tp}pp{pp}"
        sh([*CLI, "build", str(tiny), "--tp", str(tp), "--pp", str(pp), "--dtype", "fp32", "--out", str(engine),
            "--no-tune"], log, 120)
        tokens[f"tp{tp}pp{pp}"] = greedy_tokens(engine, log, ["Hello, world!", "The quick brown fox"])
        results["tiny_tokens"] = tokens
        save()
    results["tiny_greedy_equal_to_tp1"] = {k: v == tokens["tp1pp1"] for k, v in tokens.items()}
    save()
    if not args.skip_8b:
        ckpt = work / f"ckpt-{args.preset}"
        sh([*CLI, "synth", "--preset", args.preset, "--out", str(ckpt), "--device", "cuda"], log, 300)
        batch1 = ["--isl", "128", "--osl", "128", "--num-requests", "4", "--concurrency", "1"]
        for tp in (2, 1):
            engine = work / f"eng-{args.preset}-tp{tp}"
            sh([*CLI, "build", str(ckpt), "--tp", str(tp), "--dtype", "bf16", "--out", str(engine),
                "--max-batch-size", "64", "--max-seq-len", "2304", "--no-tune"], log, 300)
            results[f"tp{tp}_greedy"] = greedy_tokens(engine, log, ["Hello, world!"])
            results[f"tp{tp}_batch1"] = bench(engine, log, batch1)
            save()
        results["8b_greedy_tp2_equal_tp1"] = results["tp2_greedy"] == results["tp1_greedy"]
        if results["tp1_batch1"] and results["tp2_batch1"]:
            t1, t2 = (results[f"tp{tp}_batch1"]["output_tokens_per_s"] for tp in (1, 2))
            results["tp2_speedup_batch1"] = t2 / t1
        save()
    print(json.dumps({k: v for k, v in results.items() if k != "topology"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
