"""GPU time of one decode step of a preset's shapes, per batch size, with the default kernels
and with the kernels tuned for this GPU: random weights made on the GPU, no checkpoint and
no engine files, so it takes a minute where `run.py` takes many. It replays the runner's own
CUDA graphs (dist_runtime/cuda_graphs.py), so host work is left out: this is the step's
floor, and `dist-runtime bench` measures what is put around it.

    python benchmarks/step_time.py --preset llama-3-8b --batches 1,64,256,512 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dist_runtime.config import ModelConfig
from dist_runtime.cuda_graphs import DecodeGraphs, replay_ms
from dist_runtime.engine import TuningRecord
from dist_runtime.mapping import Mapping
from dist_runtime.models import build_model
from dist_runtime.presets import preset_config
from dist_runtime.tuning import KernelChoices, install, summary
from sharding.autotune import tune_kernels
from sharding.planner import make_plan


def random_model(config: ModelConfig, dtype: torch.dtype):
    model = build_model(config, Mapping(), range(config.num_layers), dtype, device="cuda").cuda()  # + rotary buffers
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02)
    return model


def step_ms(graphs: DecodeGraphs, b: int, context: int, block_size: int, num_blocks: int, replays: int = 20) -> float:
    """Milliseconds per replay of bucket b's graph, every sequence at `context` tokens."""
    ids, positions, slots, lens, tables = graphs._views(graphs.inputs, b)
    per_seq = -(-context // block_size)
    blocks = torch.randperm(num_blocks, device="cuda")[: b * per_seq].view(b, per_seq)
    tables[:, :per_seq] = blocks
    ids.random_(0, 1000)
    positions.fill_(context - 1)
    lens.fill_(context)
    slots.copy_(blocks[:, -1] * block_size + (context - 1) % block_size)
    return replay_ms(graphs.graphs[b][0], replays)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--batches", default="1,64,256,512")
    p.add_argument("--context", type=int, default=192, help="tokens in each sequence's cache (default 192)")
    p.add_argument("--max-seq-len", type=int, default=2304)
    p.add_argument("--profile-batches", default="1,256", help="a kernel table of these (tuned) steps")
    p.add_argument("--tuning", help="an engine.json whose tuning to use (default: tune here, about 25 s)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    config = ModelConfig.from_hf(preset_config(args.preset))
    plan = make_plan(config, 1, 1, "bf16", max_batch_size=max(batches), max_seq_len=args.max_seq_len)
    record = (TuningRecord.from_dict(json.loads(Path(args.tuning).read_text())["tuning"]) if args.tuning
              else tune_kernels(config, plan))
    print(summary(record), flush=True)
    (out / "tuning.json").write_text(json.dumps(record.to_dict(), indent=1))
    with torch.inference_mode():
        model = random_model(config, torch.bfloat16)
        bs = plan.block_size
        num_blocks = max(batches) * -(-args.context // bs) + 64
        for attn in model.attention_layers():
            shape = (num_blocks + 1, bs, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
            attn.v_cache = torch.randn_like(attn.k_cache)
        results = {"gpu": torch.cuda.get_device_name(), "context": args.context, "steps": {}}
        for variant in ("default", "tuned"):
            install(model, KernelChoices.from_record(record) if variant == "tuned" else None)
            start = time.perf_counter()
            graphs = DecodeGraphs(model, max(batches), -(-args.max_seq_len // bs), num_blocks, bs,
                                  torch.device("cuda"))
            capture_s = time.perf_counter() - start
            for b in batches:
                ms = step_ms(graphs, b, args.context, bs, num_blocks)
                results["steps"][f"{variant} {b}"] = {"ms": ms, "tokens_per_s": b / ms * 1e3}
                print(f"{variant:8s} batch {b:4d}: {ms:7.3f} ms/step  {b / ms * 1e3:9.1f} tok/s", flush=True)
            results[f"{variant} capture_s"] = capture_s
            results[f"{variant} graph_memory_bytes"] = graphs.memory_bytes
            if variant == "tuned":
                for b in (int(x) for x in args.profile_batches.split(",") if int(x) in batches):
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        step_ms(graphs, b, args.context, bs, num_blocks, replays=5)
                    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
                    (out / f"kernels_batch{b}.txt").write_text(table)
                    print(f"tuned batch {b}, 6 replays:\n{table}", flush=True)
            del graphs
            torch.cuda.empty_cache()
        (out / "step_time.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
