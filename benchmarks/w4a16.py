"""The INT4 weight-only GEMM (dist_runtime/kernels/w4a16.py) against bf16 F.linear (cuBLAS) at
Llama-3-8B's shapes: microseconds per call and the weight's bytes read per second (packed
weight, scales and zeros for int4; the bf16 weight for F.linear), beside the GPU's own
device-to-device copy rate. At up to 16 rows every decode launch candidate is timed too, so the
defaults can be checked against the best. Each timing replays a CUDA graph of calls, each on its
own copy of the weight, the copies together past the L2 cache, as a model's layers are: no
launch gaps and no cache hits that a decode step would not have. Writes JSON lines to stdout
and all rows to --out/w4a16.json.

    python benchmarks/w4a16.py --out $OUT                    # rows 1, 16, 256, 1024
    python benchmarks/w4a16.py --rows 1 --shapes 4096x4096   # one figure
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_runtime.cuda_graphs import replay_ms
from dist_runtime.int4 import quantize_int4

# Llama-3-8B's linear layers (N outputs x K inputs): fused q/k/v, o, fused gate/up, down
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
POOL_BYTES = 256 << 20  # weights timed in turn per graph: over 4 times an H100's 50 MB L2
CALLS = 16  # most calls (weight copies) in one graph
REPLAYS = 20


def copy_gbps() -> float:
    """Device-to-device copy, bytes read plus written, GB/s."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dst.copy_(src)
    return 2 * src.nbytes / replay_ms(graph, 10, rounds=3) / 1e6


def time_calls(calls: list) -> float:
    """Microseconds per call, from a graph of the calls (one per weight copy) replayed."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return replay_ms(graph, REPLAYS, rounds=3) * 1e3 / len(calls)


def measure(m: int, n: int, k: int, dtype: torch.dtype, sweep: bool, group_size: int = 128,
            tables: torch.dtype = torch.float32) -> dict:
    """One row: int4 (default launch) and bf16 F.linear at m rows of a [n, k] weight, the int4
    scales and zeros in `tables`; with `sweep`, every decode launch candidate too, and the best."""
    from triton.runtime.errors import OutOfResources

    from dist_runtime.kernels.w4a16 import (
        DECODE_CONFIGS,
        DECODE_ROWS,
        DEQUANTIZE_ROWS,
        launch_for,
        sm_count,
        w4a16_linear,
    )

    x = torch.randn(m, k, device="cuda", dtype=dtype)
    int4_bytes = n * k // 2 + 2 * n * (k // group_size) * tables.itemsize  # packed weight, scales, zeros
    copies = min(CALLS, -(-POOL_BYTES // int4_bytes))
    weights = []
    for _ in range(copies):
        qweight, scales, zeros = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, group_size)
        weights.append((qweight, scales.to(tables), zeros.to(tables)))

    def int4_us(launch: dict | None) -> float:
        return time_calls([lambda w=w: w4a16_linear(x, *w, group_size, launch=launch) for w in weights])

    us = int4_us(None)
    dequantize = m >= DEQUANTIZE_ROWS
    row = {"rows": m, "n": n, "k": k, "dtype": str(dtype).removeprefix("torch."),
           "tables": str(tables).removeprefix("torch."), "int4_us": round(us, 2),
           "int4_gbps": round(int4_bytes / us / 1e3, 1),
           "launch": {"dequantize": True} if dequantize else launch_for(m, n, k, sm_count(x))}
    if m > DECODE_ROWS:  # where the default switches between the fused kernel and dequantize-then-cuBLAS
        other = int4_us(launch_for(m, n, k, sm_count(x)) if dequantize else {"dequantize": True})
        row["fused_us" if dequantize else "dequantize_us"] = round(other, 2)
    if sweep:
        timed = {}
        for block_n, block_k, num_warps, num_stages in DECODE_CONFIGS:
            launch = dict(block_m=16, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
            try:
                timed[json.dumps(launch)] = int4_us(launch)
            except OutOfResources:  # more shared memory than this GPU has
                continue
        best = min(timed, key=timed.get)
        row.update(best_launch=json.loads(best), best_us=round(timed[best], 2),
                   best_gbps=round(int4_bytes / timed[best] / 1e3, 1),
                   sweep_us={launch: round(t, 2) for launch, t in timed.items()})
    weights.clear()  # free the int4 pool before the bf16 one
    dense_bytes = n * k * dtype.itemsize
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) for _ in range(min(CALLS, -(-POOL_BYTES // dense_bytes)))]
    dense_us = time_calls([lambda w=w: F.linear(x, w) for w in dense])
    row.update(bf16_us=round(dense_us, 2), bf16_gbps=round(dense_bytes / dense_us / 1e3, 1),
               speedup=round(dense_us / us, 2))
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,16,256,1024", help="rows of x (tokens in the step)")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in LLAMA3_8B.values()),
                   help="NxK weights (default: Llama-3-8B's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--tables", default="float32", choices=["float32", "activation"],
                   help="dtype of the int4 scales and zeros: float32 (a bf16 engine's) or x's")
    p.add_argument("--no-sweep", action="store_true", help="skip timing every decode launch")
    p.add_argument("--out", help="a folder for w4a16.json")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    tables = torch.float32 if args.tables == "float32" else dtype
    names = {v: name for name, v in LLAMA3_8B.items()}
    rows = [{"device": torch.cuda.get_device_name(), "copy_gbps": round(copy_gbps(), 1)}]
    print(json.dumps(rows[0]), flush=True)
    for m in (int(r) for r in args.rows.split(",")):
        for n, k in (tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")):
            row = {"layer": names.get((n, k), ""), **measure(m, n, k, dtype, not args.no_sweep and m <= 16,
                                                                 tables=tables)}
            row["int4_of_copy"] = round(row["int4_gbps"] / rows[0]["copy_gbps"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "w4a16.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
