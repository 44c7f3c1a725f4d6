"""The two ways a TP group's expert outputs meet (layers/moe.py), timed on real ranks: one MoE
block of a preset's shape with random weights, each rank holding its experts as the plan gives
them, at each batch size; all-reduce (every rank's [tokens, hidden] partial sum) against
all-to-all (only the rows a rank computed, to their tokens' owners, then an all-gather). Under
any launcher, on CPUs (MPI or gloo) or GPUs (NCCL):

    mpirun -np 4 python benchmarks/moe_exchange.py --ep 4 --preset qwen3-30b-a3b --batches 1,256
    mpirun -np 8 python benchmarks/moe_exchange.py --ep 8 --device cuda ...

Rank 0 prints one JSON line per (batch, exchange): the slowest rank's median milliseconds of
the block (routing, experts, exchange), and whether both exchanges gave the same output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_runtime.config import ModelConfig  # noqa: E402
from dist_runtime.layers.moe import EXCHANGES, ExpertNames, SparseMoeBlock  # noqa: E402
from dist_runtime.mapping import Mapping  # noqa: E402
from dist_runtime.presets import preset_config  # noqa: E402
from dist_runtime.world import open_communicator  # noqa: E402
from launch.rank_info import from_environment  # noqa: E402


def moe_block(config: ModelConfig, mapping: Mapping, comm, device: str, dtype: torch.dtype) -> SparseMoeBlock:
    """The block with random weights (the same on every rank where replicated), scaled as
    sharding/synth.py scales a checkpoint's."""
    moe, hidden = config.moe, config.hidden_size
    with torch.device(device):
        block = SparseMoeBlock(moe.num_experts, moe.top_k, moe.norm_topk_prob, hidden, moe.intermediate_size, mapping,
                               comm, ExpertNames("gate_proj", "up_proj", "down_proj"))
    gen = torch.Generator(device).manual_seed(mapping.ep_rank * 1000 + mapping.moe_tp_rank)
    with torch.no_grad():
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=torch.Generator(device).manual_seed(0),
                                            device=device) * 4 / hidden**0.5)
        for param, fan_in in ((block.experts.gate_up_proj, hidden), (block.experts.down_proj, moe.intermediate_size)):
            param.copy_(torch.randn(param.shape, generator=gen, device=device) / fan_in**0.5)
    return block.to(dtype).requires_grad_(False)


def median_ms(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--ep", type=int, default=None, help="expert groups (default: the world size)")
    p.add_argument("--batches", default="1,256")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPUs, bfloat16 on GPUs by default")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inter", type=int, help="the experts' intermediate size instead of the preset's: a small one "
                   "leaves the exchange, whose bytes do not depend on it, most of the time")
    args = p.parse_args()
    info = from_environment()
    mapping = Mapping(tp=info.world_size, rank=info.rank, ep=args.ep or info.world_size)
    device = f"cuda:{info.local_rank}" if args.device == "cuda" else args.device
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // info.local_world_size))
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    comm = open_communicator(info, mapping, device)
    config = ModelConfig.from_hf(preset_config(args.preset))
    if args.inter:
        config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, intermediate_size=args.inter))
    block = moe_block(config, mapping, comm, device, dtype)
    for batch in map(int, args.batches.split(",")):
        x = torch.randn(batch, config.hidden_size, generator=torch.Generator().manual_seed(batch)).to(device, dtype)
        outputs = {}
        for exchange in EXCHANGES:
            block.exchange = exchange
            outputs[exchange] = block.finish(block.partial(x)).float().cpu()
            ms = comm.gather_object(median_ms(lambda x=x: block.finish(block.partial(x)), device, args.repeats))
            if info.rank == 0:
                print(json.dumps({"preset": args.preset, "inter": config.moe.intermediate_size, "device": args.device,
                                  "tp": mapping.tp, "ep": mapping.ep, "batch": batch, "exchange": exchange,
                                  "ms": round(max(ms), 3)}), flush=True)
        same = torch.allclose(*outputs.values(), rtol=1e-3, atol=1e-3 * outputs["all-reduce"].abs().max().item())
        agreed = comm.gather_object(same)
        if info.rank == 0:
            print(json.dumps({"batch": batch, "exchanges_agree": all(agreed)}), flush=True)
    comm.close()


if __name__ == "__main__":
    main()
