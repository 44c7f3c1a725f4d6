"""The fused MoE kernels (dist_runtime/kernels/fused_moe.py) at one layer of the public MoE models'
shapes: microseconds for routing plus both grouped GEMMs, replayed from a CUDA graph as a decode
step runs them, and the bytes of the experts the step touches read per second, beside the
GPU's own device-to-device copy rate (the roofline of a step that only streams weights); and
the torch reference (layers/moe.py, expert by expert, eager) at the same sizes. Prints JSON lines
and writes them all to --out/fused_moe.json.

    python benchmarks/fused_moe.py --out $OUT                              # both shapes, bf16 and fp8
    python benchmarks/fused_moe.py --shapes qwen3-30b-a3b --tokens 1 --dtypes bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_runtime.config import ModelConfig  # noqa: E402
from dist_runtime.cuda_graphs import replay_ms  # noqa: E402
from dist_runtime.kernels.fused_moe import fused_experts, launch_for, topk_softmax  # noqa: E402
from dist_runtime.layers.moe import experts_reference  # noqa: E402
from dist_runtime.presets import preset_config  # noqa: E402
from dist_runtime.quantization import quantize_weight  # noqa: E402

REPLAYS = 20


def copy_gbps() -> float:
    """Device-to-device copy, bytes read plus written, GB/s."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dst.copy_(src)
    return 2 * src.nbytes / replay_ms(graph, 10, rounds=3) / 1e6


def layer(config: ModelConfig, fmt: str):
    """One layer's router and experts, random, in bf16 or quantized to `fmt` (one scale per row)."""
    moe, hidden = config.moe, config.hidden_size
    router = torch.randn(moe.num_experts, hidden, device="cuda", dtype=torch.bfloat16) * 4 / hidden**0.5
    gate_up = torch.randn(moe.num_experts, 2 * moe.intermediate_size, hidden, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(moe.num_experts, hidden, moe.intermediate_size, device="cuda", dtype=torch.bfloat16)
    gate_up, down = gate_up / hidden**0.5, down / moe.intermediate_size**0.5
    if fmt == "bf16":
        return router, (gate_up, down, None, None)
    (qg, sg), (qd, sd) = quantize_weight(gate_up, fmt), quantize_weight(down, fmt)
    return router, (qg, qd, sg, sd)


def run(name: str, fmt: str, tokens: int, copy_rate: float) -> dict:
    config = ModelConfig.from_hf(preset_config(name))
    moe = config.moe
    router, (gate_up, down, gate_up_scale, down_scale) = layer(config, fmt)
    x = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)

    def step():
        weights, ids = topk_softmax(x @ router.t(), moe.top_k, moe.norm_topk_prob)
        return fused_experts(x, gate_up, down, weights, ids, 0, gate_up_scale, down_scale), ids

    _, ids = step()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    us = replay_ms(graph, REPLAYS, rounds=3) * 1e3
    touched = len(torch.unique(ids))
    per_expert = sum(t[0].numel() * t.element_size() for t in (gate_up, down))
    per_expert += sum(s[0].numel() * 4 for s in (gate_up_scale, down_scale) if s is not None)
    weights, ids = topk_softmax(x @ router.t(), moe.top_k, moe.norm_topk_prob)
    start = time.perf_counter()
    for _ in range(3):
        experts_reference(x, gate_up, down, weights, ids, 0, gate_up_scale, down_scale)
    torch.cuda.synchronize()
    reference_us = (time.perf_counter() - start) / 3 * 1e6
    gbps = touched * per_expert / us / 1e3
    return {"shape": name, "dtype": fmt, "tokens": tokens, "experts_touched": touched,
            "launch": list(launch_for(tokens * moe.top_k, moe.num_experts)), "us": round(us, 1),
            "weight_gbps": round(gbps), "of_copy_rate": round(gbps / copy_rate, 3),
            "reference_us": round(reference_us, 1), "speedup": round(reference_us / us, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--tokens", default="1,8,64,256,1024")
    p.add_argument("--out", help="folder for fused_moe.json")
    args = p.parse_args()
    copy_rate = copy_gbps()
    rows = [{"gpu": torch.cuda.get_device_name(), "copy_gbps": round(copy_rate)}]
    print(json.dumps(rows[0]), flush=True)
    for name in args.shapes.split(","):
        for fmt in args.dtypes.split(","):
            for tokens in map(int, args.tokens.split(",")):
                rows.append(run(name, fmt, tokens, copy_rate))
                print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fused_moe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
