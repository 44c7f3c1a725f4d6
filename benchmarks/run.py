"""The GPU benchmark table in one process tree: synthesise a checkpoint of real shapes, build
a bf16 engine (kernels tuned for this GPU), run our `bench` and the peer (Hugging Face
transformers `generate`) on the same shapes, and the physical limit; write JSON and append a
dated row per figure to BENCHMARKS.md.

    python benchmarks/run.py --preset llama-3-8b --out $OUT
    python benchmarks/run.py --preset llama-3-8b --dtype fp8 --kv-cache-dtype fp8 --max-batch-size 1024 \
        --runs throughput,throughput-128-2048,throughput-2048-128,batch1 --skip-hf --out $OUT   # issue 7's table
    python benchmarks/run.py --preset qwen3-30b-a3b --dtype fp8 --no-weights --max-batch-size 512 \
        --runs batch1,throughput,throughput-2048-128 --out $OUT   # a mixture: 61 GB of bf16 weights, never on disk

A mixture's batch-1 roofline counts the weights one token reads (attention, dense layers, and
its top-k experts of each sparse layer), as the active-parameter figures of MoE models do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from dist_runtime.config import ModelConfig
from dist_runtime.presets import preset_config

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "dist_runtime.cli"]


def sh(cmd: list[str], log) -> str:
    print("$", " ".join(cmd), file=log, flush=True)
    start = time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    print(out.stdout[-4000:], out.stderr[-2000:], f"({time.time() - start:.1f} s)", file=log, flush=True)
    return out.stdout


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 4 * 20 / (time.perf_counter() - start)


def active_weight_bytes(config: ModelConfig, weights: int) -> int:
    """What a batch-1 step reads of `weights` bytes: all of a dense model; of a mixture, every
    expert's share but the top_k it routes a token to left out (3 matrices of hidden x
    intermediate per expert per sparse layer, at the bytes per parameter the engine stores)."""
    moe = config.moe
    if moe is None:
        return weights
    sparse_layers = config.num_layers - len(moe.dense_layers)
    expert_params = sparse_layers * moe.num_experts * 3 * config.hidden_size * moe.intermediate_size
    total_params = expert_params + _dense_params(config, sparse_layers)
    expert_bytes = weights * expert_params / total_params
    return int(weights - expert_bytes * (1 - moe.top_k / moe.num_experts))


def _dense_params(config: ModelConfig, sparse_layers: int) -> int:
    """Parameters outside the experts: attention, dense MLPs, embeddings and head (norms and routers are small)."""
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    dense_mlp = 3 * c.hidden_size * c.intermediate_size * (c.num_layers - sparse_layers)
    heads = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * attention + dense_mlp + heads


def hf_generate(ckpt: Path, batch: int, isl: int, osl: int) -> float:
    """Output tokens/s of transformers' generate, bf16, static cache, greedy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, isl), device="cuda")
    kwargs = dict(max_new_tokens=osl, min_new_tokens=osl, do_sample=False, cache_implementation="static",
                  pad_token_id=0)
    model.generate(ids, **kwargs)  # the same lengths: a static cache of another size would recompile
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    rate = batch * osl / (time.perf_counter() - start)
    del model
    torch.cuda.empty_cache()
    return rate


# name: (input tokens, output tokens, requests at a time: None for all at once, max throughput);
# besides these, throughput-ISL-OSL for any lengths (TensorRT-LLM's table: throughput-5000-500, ...)
RUNS = {"batch1": (128, 128, 1), "throughput": (128, 128, None), "ttft": (2048, 1, 1)}


def run_shape(name: str) -> tuple[int, int, int | None]:
    if name in RUNS:
        return RUNS[name]
    kind, _, lengths = name.partition("-")
    isl, _, osl = lengths.partition("-")
    if kind != "throughput" or not (isl.isdigit() and osl.isdigit()):
        raise ValueError(name)
    return int(isl), int(osl), None


def bench_options(isl: int, osl: int, concurrency: int | None, max_requests: int) -> list[str]:
    pace = ["--num-requests", "4", "--concurrency", str(concurrency)] if concurrency else [
        "--num-requests", str(max_requests)]
    return ["--isl", str(isl), "--osl", str(osl), *pace]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/dist-runtime-bench")
    p.add_argument("--max-requests", type=int, default=1024)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-ours", action="store_true", help="only the peer and the physical limit")
    p.add_argument("--max-batch-size", type=int, default=256, help="of the engine built (default 256)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8", "int8wo"], help="of the engine built")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="of the engine built")
    p.add_argument("--max-seq-len", type=int, default=2304, help="of the engine built (default 2304)")
    p.add_argument("--runs", default="batch1,throughput,ttft", help=f"comma-separated, of: {', '.join(RUNS)}")
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument("--no-weights", action="store_true", help="synthesise the checkpoint without weights (the build "
                   "draws them): for models whose checkpoint and engine would not both fit on disk; implies --skip-hf")
    p.add_argument("--capacity-policy", choices=["max_utilization", "no_evict"], help="of bench (default: its own)")
    p.add_argument("--no-tune", action="store_true", help="build without timing kernel candidates (default "
                   "launches and cuBLAS): faster to build, as fast to run for most shapes")
    args = p.parse_args()
    try:
        shapes = {name: run_shape(name) for name in args.runs.split(",")}
    except ValueError as e:
        p.error(f"unknown run {e.args[0]!r}; known: {', '.join(RUNS)}, throughput-ISL-OSL")
    policy = ["--capacity-policy", args.capacity_policy] if args.capacity_policy else []
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "bench.log", "a")  # noqa: SIM115
    kv = "" if args.kv_cache_dtype == "auto" else f"-kv{args.kv_cache_dtype}"
    # A model with fewer positions than --max-seq-len (GPT-J 6B: 2,048) gets that many in its
    # config, as TensorRT-LLM's GPT-J 2048/128 figure runs past them; the rows say so.
    raise_positions = args.max_seq_len > ModelConfig.from_hf(preset_config(args.preset)).max_position_embeddings
    ckpt = work / f"ckpt-{args.preset}{f'-p{args.max_seq_len}' if raise_positions else ''}"
    engine = work / f"eng-{ckpt.name[5:]}-{args.dtype}{kv}-b{args.max_batch_size}-s{args.max_seq_len}"
    if not (ckpt / "config.json").exists():
        sh([*CLI, "synth", "--preset", args.preset, "--out", str(ckpt), "--device", "cuda",
            *(["--max-positions", str(args.max_seq_len)] if raise_positions else []),
            *(["--no-weights"] if args.no_weights else [])], log)
    if not args.skip_ours and not (engine / "engine.json").exists():
        sh([*CLI, "build", str(ckpt), "--dtype", args.dtype, "--kv-cache-dtype", args.kv_cache_dtype, "--out",
            str(engine), "--max-batch-size", str(args.max_batch_size), "--max-seq-len", str(args.max_seq_len),
            "--max-num-tokens", "8192", *(["--no-tune"] if args.no_tune else [])], log)
    gpu = torch.cuda.get_device_name()
    # the bytes a batch-1 step reads: the engine's (quantized weights are smaller) once it is built
    weights = sum(f.stat().st_size for f in (engine if engine.exists() else ckpt).glob("*.safetensors"))
    bw = copy_bandwidth()
    rows, results = [], {"gpu": gpu, "preset": args.preset, "copy_bandwidth_Bps": bw, "weight_bytes": weights,
                         "positions_raised_to": args.max_seq_len if raise_positions else None}
    if not args.skip_ours:
        from dist_runtime.engine import TuningRecord
        from dist_runtime.tuning import summary

        results["tuning"] = tuning = json.loads((engine / "engine.json").read_text())["tuning"]
        record = TuningRecord.from_dict(tuning)
        if record.tuned:
            rows.append(("kernel tuning at build", f"{record.seconds or 0} s", summary(record)))
    runs = {name: bench_options(*shape, args.max_requests) + policy for name, shape in shapes.items()}
    for name, extra in ({} if args.skip_ours else runs).items():
        cmd = [*CLI, "bench", str(engine), "--device", "cuda", "--json", "--no-verify", *extra]  # build hashed them
        report = json.loads(sh(cmd, log))
        results[name] = report
        figure = (f"{report['ttft_ms']['p50']:.1f} ms TTFT p50" if name == "ttft"
                  else f"{report['output_tokens_per_s']:.1f} output tok/s")
        what = f"dist-runtime {args.dtype}{' fp8 KV' if kv else ''} {name}"
        if raise_positions:
            what += f" (positions raised to {args.max_seq_len})"
        rows.append((what, figure, "dist-runtime bench " + " ".join(extra)))
        (out / "bench.json").write_text(json.dumps(results, indent=1))
    profiles = {"batch1": ["--isl", "128", "--osl", "32", "--num-requests", "1", "--concurrency", "1"],
                "throughput": ["--isl", "128", "--osl", "16", "--num-requests", "256"]}
    for name, extra in ({} if args.skip_ours or args.skip_profile else profiles).items():
        sh([*CLI, "bench", str(engine), "--device", "cuda", "--json", "--no-verify", *extra, "--profile",
            str(out / f"profile_{name}.txt")], log)
    active = active_weight_bytes(ModelConfig.from_hf(preset_config(args.preset)), weights)
    what = "weights" if active == weights else "the weights one token reads (its top-k experts of each layer)"
    rows.append((f"roofline batch 1, {args.dtype} ({what} / copy bandwidth)", f"{bw / active:.1f} tok/s",
                 f"{active / 1e9:.2f} GB read per token, {bw / 1e12:.2f} TB/s measured copy"))
    if not args.skip_hf and not args.no_weights:
        for batch in (1, 64):
            rate = hf_generate(ckpt, batch, 128, 128)
            results[f"hf batch {batch}"] = rate
            rows.append((f"HF transformers generate, batch {batch}, 128/128, bf16 static cache",
                         f"{rate:.1f} output tok/s",
                         "benchmarks/run.py hf_generate"))
            (out / "bench.json").write_text(json.dumps(results, indent=1))
    date = time.strftime("%Y-%m-%d")
    lines = [f"| {date} | {gpu} | {args.preset} | {what} | {figure} | `{how}` |" for what, figure, how in rows]
    with open(ROOT / "BENCHMARKS.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    (out / "rows.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
