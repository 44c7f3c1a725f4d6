"""The `dist-runtime` command: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import signal
import sys
import threading

from safetensors.torch import save_file

from dist_runtime import logs
from dist_runtime.accuracy import compare
from dist_runtime.bench import run_bench
from dist_runtime.config import ModelConfig
from dist_runtime.demo import run_demo
from dist_runtime.engine_cache import CACHE_ENV, HUB_ID, prepare
from dist_runtime.errors import DistRuntimeError
from dist_runtime.layers.moe import EXCHANGES
from dist_runtime.llm import LLM
from dist_runtime.plan_report import format_plan
from dist_runtime.presets import PRESETS, preset_config, to_transformers5_layout
from dist_runtime.runtime_config import CAPACITY_POLICIES, LAUNCHERS, RuntimeConfig
from dist_runtime.sampling_params import SamplingParams
from dist_runtime.tuning import summary
from launch.rank_info import from_environment
from launch.spmd import serve_other_rank
from sharding.builder import BUILDABLE, build_engine, refit_engine
from sharding.gguf import convert
from sharding.planner import make_plan, smallest_fitting_plan
from sharding.prequantized import plan_options, read_scheme
from sharding.synth import write_checkpoint

API_KEY_ENV = "DIST_RUNTIME_API_KEY"
MODEL_HELP = ("a Hugging Face checkpoint folder, a Hub id in the local Hugging Face cache, or an engine folder "
              "(or engine_dir in --config FILE)")


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default 1)")
    p.add_argument("--ep", type=int, default=1, help="a mixture's experts in this many groups of whole experts per "
                   "TP group, each expert split over tp / ep ranks (default 1: every rank a slice of each)")
    p.add_argument("--expert-exchange", choices=EXCHANGES, default="all-reduce",
                   help="with --ep > 1, how the ranks' expert outputs meet (default all-reduce)")
    p.add_argument("--dtype", choices=BUILDABLE,
                   help="engine precision (default: the checkpoint's own; int4 engines are W4A16, their activations "
                   "bf16, or fp16 or fp32 as named)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="auto: the engine's dtype (default); fp8: E4M3 with a scale per KV head, half the bytes")
    p.add_argument("--layers", help="layers per PP stage, e.g. 10,11,11 (default: as even as possible)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences running at once (default 16)")
    p.add_argument("--max-seq-len", type=int, help="tokens per sequence, prompt + output "
                   "(default: the model's positions, at most 4096)")
    p.add_argument("--max-num-tokens", type=int, help="tokens per step (default min(8192, batch x seq len))")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _plan_kwargs(args: argparse.Namespace) -> dict:
    return dict(layer_counts=[int(x) for x in args.layers.split(",")] if args.layers else None,
                kv_cache_dtype=args.kv_cache_dtype, max_batch_size=args.max_batch_size,
                max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens, block_size=args.block_size,
                ep=args.ep, expert_exchange=args.expert_exchange)


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """RuntimeConfig's fields as flags. A flag left out takes the --config file's value, else the
    default RuntimeConfig declares (shown in the help)."""
    d, unset = RuntimeConfig, argparse.SUPPRESS
    p.add_argument("--config", metavar="FILE", help="runtime options from a YAML file, one `field: value` per line "
                   "(the fields of dist_runtime.runtime_config.RuntimeConfig, engine_dir among them); "
                   "the flags given here override it")
    p.add_argument("--device", default=unset, help=f"cpu, or cuda: each rank takes GPU local_rank (default {d.device})")
    p.add_argument("--no-verify", dest="verify", action="store_false", default=unset,
                   help="skip the sha256 check of rank files")
    p.add_argument("--kv-cache-fraction", type=float, default=unset,
                   help=f"of the GPU memory free after loading (default {d.kv_cache_fraction})")
    p.add_argument("--no-overlap", dest="overlap", action="store_false", default=unset,
                   help="schedule each step only after the one before has finished (by default, with one pipeline "
                   "stage, the next step is scheduled while the device runs, and with pp > 1, each stage runs a "
                   "micro-batch of its own)")
    p.add_argument("--launcher", choices=LAUNCHERS, default=unset,
                   help="who starts ranks 1..N-1 when no launcher started this process: child processes on "
                   f"this host (local), or Ray actors (default {d.launcher})")
    p.add_argument("--ray-address", default=unset, help="with --launcher ray: the cluster's HOST:PORT, or auto (the "
                   "cluster of this host); default: as auto, but with no cluster a new local Ray starts")
    p.add_argument("--rank-timeout", dest="rank_timeout_s", type=float, default=unset,
                   help="seconds a rank may be silent or stuck in one step before it counts as lost and the job "
                   f"stops (default {d.rank_timeout_s:g})")
    limits = p.add_argument_group("serving limits, set at each start (default: those the engine was planned with)")
    limits.add_argument("--max-batch-size", type=_positive_int, default=unset, help="sequences running at once")
    limits.add_argument("--max-seq-len", type=_positive_int, default=unset,
                        help="tokens per sequence, prompt and output, up to the model's positions")
    limits.add_argument("--max-num-tokens", type=_positive_int, default=unset, help="tokens per step")
    limits.add_argument("--capacity-policy", choices=CAPACITY_POLICIES, default=unset,
                        help="max_utilization: admit while the KV cache has room, preempting (and later recomputing) "
                        "the newest sequence when it fills; no_evict: admit a sequence only where the cache holds it "
                        f"and every running one to their longest, never preempting (default {d.capacity_policy})")
    build = p.add_argument_group("building a model's engine on first use (MODEL a checkpoint folder or Hub id)")
    build.add_argument("--tp", type=_positive_int, default=unset, help="tensor-parallel ranks (default 1)")
    build.add_argument("--pp", type=_positive_int, default=unset, help="pipeline-parallel stages (default 1)")
    build.add_argument("--ep", type=_positive_int, default=unset, help="expert-parallel groups of each TP group, a "
                       "divisor of --tp (mixtures of experts; default 1)")
    build.add_argument("--dtype", choices=BUILDABLE, default=unset, help="engine precision (default: the "
                       "checkpoint's own quantization, else bf16 on GPUs and fp32 on CPUs)")
    build.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default=unset, help="(default auto)")
    build.add_argument("--engine-cache", metavar="DIR", default=unset, help="where built engines are kept (default "
                       f"${CACHE_ENV}, else ~/.cache/dist-runtime/engines)")
    build.add_argument("--no-tune", dest="tune", action="store_false", default=unset,
                       help="skip timing kernel candidates on the GPU while building")


def _runtime_config(args: argparse.Namespace, model: str | None) -> RuntimeConfig:
    """The job's RuntimeConfig: the --config file's options, with the flags given over them."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RuntimeConfig) if hasattr(args, f.name)}
    if model:
        given["engine_dir"] = model
    if args.config:
        return RuntimeConfig.from_file(args.config, **given)
    return RuntimeConfig.from_dict(given, "the command line")


def _prepared(config: RuntimeConfig) -> RuntimeConfig:
    """`config` naming the engine to run: its model's engine is built now if it was not before
    (under a launcher by whichever rank comes first; the others wait for it and reuse it)."""
    rank = getattr(from_environment(), "rank", 0)
    return prepare(config, say=lambda line: print(line, file=sys.stderr) if rank == 0 else None)


def _default_dtype(config, checkpoint: str | None = None) -> str:
    """The checkpoint's own precision: its quantization's (fp8, int4), else its float dtype's."""
    scheme = read_scheme(checkpoint) if checkpoint else None
    if scheme is not None:
        return scheme.kind
    return {"float32": "fp32", "float16": "fp16"}.get(config.dtype, "bf16")


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    print(f"wrote {convert(args.gguf, args.out)} (float32 safetensors, config, tokenizer, chat template)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    config = preset_config(args.preset, args.arch)
    if args.max_positions:  # GPT-J's field, or Llama's
        config["n_positions" if "n_positions" in config else "max_position_embeddings"] = args.max_positions
    if args.layout == 5:
        config = to_transformers5_layout(config)
    out = write_checkpoint(config, args.out, seed=args.seed, dtype=args.dtype, device=args.device,
                           shard_bytes=int(args.shard_gb * 2**30), progress=sys.stderr.isatty(), weights=args.weights)
    weights = "" if args.weights else " (no weights: `build` draws them)"
    print(f"wrote {args.preset} ({config['model_type']}) checkpoint to {out}{weights}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    if bool(args.checkpoint) == bool(args.preset):
        raise DistRuntimeError("give a checkpoint folder or --preset NAME (one of them)")
    config = (ModelConfig.from_hf(preset_config(args.preset, args.arch)) if args.preset
              else ModelConfig.from_dir(args.checkpoint))
    options = _plan_kwargs(args) | (plan_options(args.checkpoint) if args.checkpoint else {})
    dtype = args.dtype or _default_dtype(config, args.checkpoint)
    plan = make_plan(config, args.tp, args.pp, dtype, gpu_mem_gib=args.gpu_mem, **options)
    suggestion = None
    if not plan.fits:
        suggestion = smallest_fitting_plan(config, dtype, args.gpu_mem, args.gpus_per_node, **options)
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "fits": plan.fits,
                          "smallest_fitting": suggestion and {"tp": suggestion.tp, "pp": suggestion.pp,
                                                              "ep": suggestion.ep}}, indent=1))
    else:
        print(format_plan(config, plan, suggestion, args.preset or args.checkpoint, args.gpus_per_node))
    return 0 if plan.fits else 1


def cmd_build(args: argparse.Namespace) -> int:
    dtype = args.dtype or _default_dtype(ModelConfig.from_dir(args.checkpoint), args.checkpoint)
    engine = build_engine(args.checkpoint, args.out, args.tp, args.pp, dtype, progress=sys.stderr.isatty(),
                          tune=not args.no_tune, calib=args.calib, **_plan_kwargs(args))
    size = sum(f["bytes"] for f in engine.files.values())
    print(f"built {args.out}: {engine.world_size} rank files (tp={args.tp} x pp={args.pp}, {dtype}), "
          f"{size / 2**20:.1f} MiB")
    print(summary(engine.tuning))
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    engine = refit_engine(args.engine, args.checkpoint, progress=sys.stderr.isatty())
    print(f"refit {args.engine} with the weights of {args.checkpoint} ({engine.world_size} rank files)")
    return 0


def _sampling(args: argparse.Namespace):
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=tuple(args.stop or ()), ignore_eos=args.ignore_eos, n=args.n,
                          logprobs=args.logprobs)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)  # bad parameters fail before any rank starts
    config = _prepared(_runtime_config(args, args.model))
    if (code := serve_other_rank(config)) is not None:
        return code
    prompts = args.prompt or ["Hello, world!"]
    with LLM(config=config) as llm:
        outputs = llm.generate(prompts, params, return_logits=bool(args.save_logits))
    if args.save_logits:
        save_file({f"prompt_{i}": o.outputs[0].logits for i, o in enumerate(outputs)}, args.save_logits)
    for out in outputs:
        if args.json:
            completions = [_completion_json(c) for c in out.outputs]
            record = {"prompt": out.prompt, **completions[0]} if args.n == 1 else {"prompt": out.prompt,
                                                                                  "outputs": completions}
            print(json.dumps(record, ensure_ascii=False))
        else:
            for c in out.outputs:
                print(f"{out.prompt!r} -> {c.text!r} ({len(c.token_ids)} tokens, {c.finish_reason})")
    return 0


def _completion_json(c) -> dict:
    record = {"token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason}
    if c.logprobs is not None:
        record["logprobs"] = [{"token_id": t.token_id, "logprob": t.logprob, "top": t.top} for t in c.logprobs]
    return record


def cmd_bench(args: argparse.Namespace) -> int:
    if args.concurrency and args.request_rate:
        raise DistRuntimeError("give --concurrency or --request-rate, not both")
    if bool(args.model or args.config) == bool(args.url):
        raise DistRuntimeError("give a model or engine folder, or --url of a running server (one of them)")
    if args.url:
        from dist_runtime.bench_http import run_http_bench  # httpx, which only this needs

        report = run_http_bench(args.url, args.isl, args.osl, args.num_requests, args.concurrency,
                                args.request_rate, args.seed, args.api_key or os.environ.get(API_KEY_ENV))
        print(json.dumps(report, indent=1) if args.json else
              f"{report['num_requests']} requests over HTTP, {report['errors']} errors, {report['duration_s']:.2f} s: "
              f"{report['output_tokens_per_s']:.1f} output tokens/s; client-side TTFT p50/p90/p99 "
              f"{_p(report['ttft_ms'])} ms; TPOT {_p(report['tpot_ms'])} ms")
        return 0
    config = _prepared(_runtime_config(args, args.model))
    if (code := serve_other_rank(config)) is not None:
        return code
    with LLM(config=config) as llm:
        report = run_bench(llm, args.isl, args.osl, args.num_requests, args.concurrency, args.request_rate,
                           args.seed, progress=sys.stderr.isatty(), profile=args.profile)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        o = report["step_overhead_ms"]
        print(f"{report['num_requests']} requests, {args.isl} in / {args.osl} out, {report['duration_s']:.2f} s: "
              f"{report['output_tokens_per_s']:.1f} output tokens/s, {report['requests_per_s']:.2f} requests/s\n"
              f"TTFT p50/p90/p99 {_p(report['ttft_ms'])} ms; TPOT {_p(report['tpot_ms'])} ms\n"
              f"rank-0 step overhead {o['total_at_max_running']:.3f} ms at {report['max_running']} running "
              f"({100 * o['share_of_step_time']:.1f}% of step time); KV peak {report['kv_cache']['peak_usage']:.0%} "
              f"of {report['kv_cache']['blocks']} blocks; {report['preemptions']} preemptions")
        if report["gpu_clocks"]:
            c = report["gpu_clocks"]
            print(f"{c['gpu']}: SM clock mean {c['sm_clock_mhz']['mean']:.0f} MHz (max {c['max_sm_clock_mhz']}), "
                  f"power mean {c['power_w']['mean']:.0f} W of {c['power_limit_w']:.0f} W, held by the power limit "
                  f"{c['power_capped_share']:.0%} of the run")
    if report["kernels_compiled_in_run"]:  # on stderr, so that it shows with --json too
        print(f"warning: kernels compiled inside the timed run (their compile time is in the figures): "
              f"{report['kernels_compiled_in_run']}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dist_runtime.server.lifecycle import serve  # FastAPI and uvicorn: the serve extra
    from dist_runtime.server.served import ServerSettings

    given = _runtime_config(args, args.model)
    config = _prepared(given)
    if (code := serve_other_rank(config)) is not None:
        return code
    settings = ServerSettings(args.model_name or _model_name(given.engine_dir), _api_key(args),
                              args.max_concurrency, args.max_request_sequences, args.max_body_bytes,
                              args.drain_timeout, args.chat_template)
    return serve(config, settings, args.host, args.port)


def _model_name(model: str) -> str:
    """What clients call the model: a Hub id as it is, a folder by its name."""
    return model if not os.path.exists(model) and HUB_ID.fullmatch(model) else os.path.basename(os.path.normpath(model))


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the first line of --api-key-file, else $DIST_RUNTIME_API_KEY (the file and the
    variable keep the key out of `ps`)."""
    if args.api_key_file:
        try:
            key = open(args.api_key_file).readline().strip()
        except OSError as e:
            raise DistRuntimeError(f"--api-key-file: {e}") from e
        if not key:
            raise DistRuntimeError(f"--api-key-file: {args.api_key_file} holds no key on its first line")
        return key
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def _p(stats: dict) -> str:
    return f"{stats['p50']:.1f}/{stats['p90']:.1f}/{stats['p99']:.1f}"


def cmd_accuracy(args: argparse.Namespace) -> int:
    config = _runtime_config(args, args.reference)  # LLM takes each engine folder over it
    report = compare(args.reference, args.engine, args.prompts, args.steps, text=args.text, config=config)
    print(json.dumps(report, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.out)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dist-runtime", description="Plan, build and run sharded LLM engines.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a random-weight Hugging Face checkpoint of a named shape")
    p.add_argument("--arch", choices=list(PRESETS), help="family (picks among presets named alike, e.g. tiny)")
    p.add_argument("--preset", default="tiny", help="tiny, llama-3-8b, qwen2.5-7b, qwen3-8b, phi-3-mini, "
                   "mistral-7b, gpt-j-6b, ...")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the preset's")
    p.add_argument("--layout", type=int, choices=[4, 5], default=4, help="config.json as transformers 4 or 5 writes it")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5 GiB)")
    p.add_argument("--device", default="cpu", help="where random numbers are drawn (cuda is faster for 8B)")
    p.add_argument("--no-weights", dest="weights", action="store_false",
                   help="write config and tokenizer only: `build` draws each tensor as it reads it (the same "
                   "bits), for an engine whose checkpoint would not fit beside it on disk")
    p.add_argument("--max-positions", type=int, help="positions in config.json instead of the preset's (GPT-J "
                   "6B has 2,048: a 2,048-token prompt and its output need more)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert-gguf", help="a GGUF file to a Hugging Face checkpoint folder (float32 safetensors)")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("plan", help="how a model splits over tp x pp ranks, and whether it fits")
    p.add_argument("checkpoint", nargs="?", help="Hugging Face checkpoint folder")
    p.add_argument("--preset", help="plan a named shape without a checkpoint (e.g. llama-3-70b)")
    p.add_argument("--arch", choices=list(PRESETS))
    _add_plan_options(p)
    p.add_argument("--gpu-mem", type=float, help="GiB of memory per GPU to check the plan against")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for the suggested layout (default 8)")
    p.add_argument("--json", action="store_true", help="the whole plan, every weight slice, as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("build", help="write one engine file per rank from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    _add_plan_options(p)
    p.add_argument("--no-tune", action="store_true", help="skip timing kernel candidates on this GPU "
                   "(the runner then takes default launches and cuBLAS)")
    p.add_argument("--calib", metavar="FILE", help="text to run through the float32 CPU reference for static fp8 "
                   "scales: GEMM inputs (--dtype fp8; else per token) and KV heads (--kv-cache-dtype fp8; else 1.0)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("refit", help="replace an engine's weights with another checkpoint's (same shapes)")
    p.add_argument("engine")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_refit)

    p = sub.add_parser("generate", help="generate text; spawns the engine's ranks unless a launcher did")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--logprobs", type=int, help="log-probabilities of the sampled and top-N tokens")
    p.add_argument("--seed", type=int, help="same seed, same output, whatever the TP/PP layout")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--save-logits", metavar="FILE", help="write each prompt's logits per step (safetensors)")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="throughput and latency on a synthetic workload")
    p.add_argument("model", nargs="?", help=MODEL_HELP + " (or --url)")
    p.add_argument("--url", help="drive a running `serve` over HTTP instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="for --url (or set DIST_RUNTIME_API_KEY)")
    p.add_argument("--isl", type=int, default=128, help="input tokens per request (default 128)")
    p.add_argument("--osl", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, help="requests in flight at once (default: all)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--seed", type=int, default=0, help="for the random prompts")
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", metavar="FILE", help="write a torch profiler summary of the run to FILE")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server on rank 0")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but health and metrics "
                                      "(visible in ps: prefer --api-key-file or $DIST_RUNTIME_API_KEY)")
    p.add_argument("--api-key-file", help="read the API key from the first line of this file")
    p.add_argument("--max-concurrency", type=_positive_int, default=256,
                   help="sequences in flight (prompts x n of every request) before 429 (default 256)")
    p.add_argument("--max-request-sequences", type=_positive_int,
                   help="sequences one request may run before 400 (default: --max-concurrency)")
    p.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20,
                   help="request bodies past this size, once inflated, get 413 (default 1 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C: seconds requests in flight get to finish (default 30)")
    p.add_argument("--chat-template", metavar="FILE_OR_NAME",
                   help="a Jinja chat template file, or the name of one of the model's named templates, "
                        "instead of the model's default")
    p.add_argument("--model-name", help="the model id clients name (default: the engine folder's name)")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("accuracy", help="how far an engine's logits and greedy tokens are from a reference engine's")
    p.add_argument("reference", help="the reference engine (e.g. bf16) built from the same checkpoint")
    p.add_argument("engine", help="the engine to measure (e.g. fp8 or int8wo)")
    p.add_argument("--prompts", type=int, default=8, help="random prompts (default 8)")
    p.add_argument("--steps", type=int, default=125, help="positions per prompt (default 125: 1,000 in all)")
    p.add_argument("--text", metavar="FILE", help="prompts cut from this text, as the reference's tokenizer reads "
                   "it (default: random token ids)")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_accuracy)

    p = sub.add_parser("demo", help="synth, plan, build and generate a tiny model on 4 CPU ranks (TP=2 x PP=2)")
    p.add_argument("--out", help="keep the checkpoint and engine here (default: a temporary folder)")
    p.set_defaults(func=cmd_demo)
    return top


STOP_GRACE_S = 5.0  # a requested stop that has not ended the process by then ends it


def _stop_requested(signum: int, frame) -> None:
    """SIGTERM and Ctrl-C unwind the same way (every rank is stopped on the way out), and a
    backstop ends this process if the unwinding hangs."""
    timer = threading.Timer(STOP_GRACE_S, os._exit, args=(128 + signum,))
    timer.daemon = True
    timer.start()
    _signalled.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


_signalled: list[int] = []  # the signals that stopped this process


def _exit_after_signal() -> None:
    """Leave at once once a signal's unwinding has stopped every rank: the interpreter's own
    teardown would run the destructors of communicators whose threads may still be inside a
    collective with a rank that was just ended, and those can abort the process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + _signalled[0])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_requested)
    signal.signal(signal.SIGINT, _stop_requested)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` shows where a stuck rank is
    try:
        rank = getattr(from_environment(), "rank", 0)
    except (ValueError, DistRuntimeError) as e:  # a launcher variable or secret this rank cannot use
        print(f"error: {e}", file=sys.stderr)
        return 1
    logs.configure(rank)
    try:
        return args.func(args)
    except DistRuntimeError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if _signalled:
            _exit_after_signal()


if __name__ == "__main__":
    sys.exit(main())
