"""Tensor parallelism on several GPUs of one host, in one call: the machine's topology and NCCL
version, the latency of an all-reduce of one token's hidden state, greedy tokens of TP=2 against
TP=1, and batch-1 speed of TP=1 and TP=2 on a real-shape checkpoint. Writes JSON and table rows
under --out.

    python benchmarks/multi_gpu.py --out $OUT [--preset llama-3-8b] [--skip-8b]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "dist_runtime.cli"]


def mpirun(n: int) -> list[str]:
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(n)]
    version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True).stdout
    return cmd + (["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else [])


def sh(cmd: list[str], log, check: bool = True) -> str:
    print("$", " ".join(cmd), file=log, flush=True)
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(out.stdout[-3000:], out.stderr[-3000:], f"(exit {out.returncode}, {time.time() - start:.1f} s)", file=log,
          flush=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed: {out.stderr[-1500:]}")
    return out.stdout


def allreduce_worker(size_bytes: int, iters: int) -> None:
    """Under mpirun -np N: time NCCL all-reduces of `size_bytes` of bf16, eager and in a CUDA graph."""
    import faulthandler

    import torch

    from dist_runtime.comm.mpi import MpiCommunicator
    from dist_runtime.comm.nccl import NcclCommunicator
    from dist_runtime.mapping import Mapping
    from launch.rank_info import from_environment

    faulthandler.dump_traceback_later(45, exit=True)  # a hang shows where it is
    info = from_environment()
    mapping = Mapping(tp=info.world_size, pp=1, rank=info.rank)
    torch.cuda.set_device(info.local_rank)
    print(f"rank {info.rank}: cuda:{torch.cuda.current_device()}", flush=True)
    comm = NcclCommunicator(mapping, MpiCommunicator(mapping))
    print(f"rank {info.rank}: NCCL communicators up", flush=True)
    x = torch.ones(size_bytes // 2, dtype=torch.bfloat16, device="cuda")
    for _ in range(20):
        comm.all_reduce(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        comm.all_reduce(x)
    torch.cuda.synchronize()
    eager_us = (time.perf_counter() - start) / iters * 1e6
    print(f"rank {info.rank}: eager {eager_us:.1f} us, sum {x[0].item()}", flush=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(iters):
                comm.all_reduce(x)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    graph_us = (time.perf_counter() - start) / iters * 1e6
    if info.rank == 0:
        print(json.dumps({"bytes": size_bytes, "ranks": info.world_size, "eager_us": eager_us,
                          "graph_us": graph_us}), flush=True)
    del graph
    comm.close()


def greedy_tokens(engine: Path, ranks: int, log, prompts: list[str]) -> list[list[int]]:
    cmd = [*(mpirun(ranks) if ranks > 1 else []), *CLI, "generate", str(engine), "--device", "cuda",
           "--temperature", "0", "--ignore-eos", "--max-tokens", "8", "--json",
           *[a for p in prompts for a in ("--prompt", p)]]
    return [json.loads(line)["token_ids"] for line in sh(cmd, log).splitlines() if line.startswith("{")]


def bench(engine: Path, ranks: int, log, extra: list[str]) -> dict:
    cmd = [*(mpirun(ranks) if ranks > 1 else []), *CLI, "bench", str(engine), "--device", "cuda", "--json", *extra]
    return json.loads(sh(cmd, log))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--work", default="/tmp/dist-runtime-multi")
    p.add_argument("--skip-8b", action="store_true", help="only topology, all-reduce and tiny-model tokens")
    p.add_argument("--allreduce-worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allreduce_worker:
        allreduce_worker(args.allreduce_worker, 1000)
        return 0
    import torch
    from cupy.cuda import nccl

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "multi_gpu.log", "a")  # noqa: SIM115
    gpus = torch.cuda.device_count()
    results = {"gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "nccl_version": nccl.get_version(),
               "topology": subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout}
    save = lambda: (out / "multi_gpu.json").write_text(json.dumps(results, indent=1))  # noqa: E731
    save()
    results["allreduce"] = [json.loads(sh([*mpirun(gpus), sys.executable, __file__, "--out", str(out),
                                           "--allreduce-worker", str(size)], log).splitlines()[-1])
                            for size in (8192, 1 << 20)]
    save()
    tiny = work / "ckpt-tiny"
    sh([*CLI, "synth", "--out", str(tiny), "--dtype", "bfloat16"], log)
    tokens = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        engine = work / f"eng-tiny-tp{tp}pp{pp}"
        sh([*CLI, "build", str(tiny), "--tp", str(tp), "--pp", str(pp), "--dtype", "bf16", "--out", str(engine),
            "--no-tune"], log)
        tokens[f"tp{tp}pp{pp}"] = greedy_tokens(engine, tp * pp, log, ["Hello, world!", "The quick brown fox"])
    results["tiny_greedy_equal_to_tp1"] = {k: v == tokens["tp1pp1"] for k, v in tokens.items()}
    save()
    if not args.skip_8b:
        ckpt = work / f"ckpt-{args.preset}"
        sh([*CLI, "synth", "--preset", args.preset, "--out", str(ckpt), "--device", "cuda"], log)
        batch1 = ["--isl", "128", "--osl", "128", "--num-requests", "4", "--concurrency", "1"]
        for tp in (1, 2):
            engine = work / f"eng-{args.preset}-tp{tp}"
            sh([*CLI, "build", str(ckpt), "--tp", str(tp), "--dtype", "bf16", "--out", str(engine),
                "--max-batch-size", "64", "--max-seq-len", "2304", "--no-tune"], log)
            results[f"tp{tp}_greedy"] = greedy_tokens(engine, tp, log, ["Hello, world!"])
            results[f"tp{tp}_batch1"] = bench(engine, tp, log, batch1)
            save()
        results["8b_greedy_tp2_equal_tp1"] = results["tp2_greedy"] == results["tp1_greedy"]
        t1, t2 = (results[f"tp{tp}_batch1"]["output_tokens_per_s"] for tp in (1, 2))
        results["tp2_speedup_batch1"] = t2 / t1
        save()
    print(json.dumps({k: v for k, v in results.items() if k != "topology"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
