"""`dist-runtime bench`: a synthetic workload through the LLM API, measured.

Prompts are random token ids of `isl` tokens; every request generates exactly `osl` tokens
(greedy, end-of-sequence ignored). Requests go in all at once (the default: maximum
throughput), `concurrency` at a time, or arriving as a Poisson process at `request_rate`.
"""

from __future__ import annotations

import queue
import random
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from dist_runtime.gpu_clocks import gpu_clocks
from dist_runtime.kernels import compiled_variants
from dist_runtime.llm import LLM
from dist_runtime.sampling_params import SamplingParams


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    a = np.asarray(values) * scale
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _warm_up(llm: LLM, first: list[int], second: list[int], crowd: list[list[int]]) -> None:
    """Run each kind of step once before the clock starts: a prefill, decodes, and a step that
    mixes decodes with a prefill (Triton compiles a kernel at its first launch, which would cost
    the first measured run a second); then `crowd`, short prompts as many at a time as the
    measured run will hold, so that its batch sizes have been seen too (BENCHMARKS.md: without
    them, the first run of 1,024 requests in a process waits 2.2 s for its median first token
    instead of 1.2 s). No prompt shares a prefix with those
    measured: a repeated prompt would be served from the prefix cache."""
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    decoding = llm.submit(first, warm)
    deadline = time.monotonic() + 60
    while not (decoding.seqs and decoding.seqs[0].num_output) and time.monotonic() < deadline:
        time.sleep(0.001)
    joining = llm.submit(second, warm)
    decoding.result(timeout=60)
    joining.result(timeout=60)
    if len(crowd) > 1:
        llm.generate(crowd, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False))


def run_bench(llm: LLM, isl: int, osl: int, num_requests: int, concurrency: int | None = None,
              request_rate: float | None = None, seed: int = 0, progress: bool = False,
              profile: str | None = None) -> dict:
    rng = random.Random(seed)
    vocab = llm.engine.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(isl)] for _ in range(num_requests + 2)]
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True, detokenize=False)
    crowd = min(concurrency or num_requests, llm.engine.plan.max_batch_size)
    warm_rng = random.Random(seed + 1)  # rng goes on to draw the arrival times
    _warm_up(llm, prompts.pop(), prompts.pop(), [[warm_rng.randrange(vocab) for _ in range(min(isl, 16))]
                                                 for _ in range(crowd)])
    llm.coordinator.timings.clear()  # the window measured starts here
    busy_before = {r["rank"]: r["busy_s"] for r in llm.stats()["ranks"]}
    compiled_before = compiled_variants()
    limit = concurrency or num_requests
    bar = tqdm(total=num_requests, unit="req", desc="bench", disable=not progress)
    finished: queue.Queue = queue.Queue()
    with _profiler(profile) as prof, gpu_clocks(llm.device) as clocks:
        start = time.perf_counter()
        pending, in_flight, outputs = list(prompts), 0, []
        next_arrival = start
        while pending or in_flight:
            while pending and in_flight < limit and time.perf_counter() >= next_arrival:
                llm.submit(pending.pop(0), params).add_done_callback(finished.put)
                in_flight += 1
                if request_rate:
                    next_arrival += rng.expovariate(request_rate)
            wait = max(0.0, next_arrival - time.perf_counter()) if pending and in_flight < limit else None
            try:  # block until a request ends (or the next one is due): no polling beside the engine
                outputs.append(finished.get(timeout=wait).result())
                in_flight -= 1
                bar.update(1)
            except queue.Empty:
                pass
        elapsed = time.perf_counter() - start
    bar.close()
    if prof is not None:
        with open(profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total" if llm.device != "cpu"
                                              else "self_cpu_time_total", row_limit=40))
    report = _report(llm, outputs, elapsed, isl, osl, concurrency, request_rate, busy_before)
    # rank 0's GPU over the timed window: its clock, power, and how much of it the power limit held
    report["gpu_clocks"] = clocks.summary() if clocks is not None else None
    # rank 0's process only: other ranks compile the same kernels, at the same steps
    report["kernels_compiled_in_run"] = {name: n - compiled_before.get(name, 0) for name, n in
                                         compiled_variants().items() if n > compiled_before.get(name, 0)}
    return report


def _profiler(path: str | None):
    if path is None:
        return nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _report(llm: LLM, outputs: list, elapsed: float, isl: int, osl: int, concurrency, request_rate,
            busy_before: dict[int, float]) -> dict:
    ttft = [o.first_token_time - o.arrival_time for o in outputs]
    tpot = [(o.finish_time - o.first_token_time) / (len(o.token_ids) - 1) for o in outputs if len(o.token_ids) > 1]
    generated = sum(len(o.token_ids) for o in outputs)
    timings = list(llm.coordinator.timings)
    busiest = max((t.running for t in timings), default=0)
    stats = llm.stats()
    plan = llm.engine.plan
    # The share of the window each rank spent neither in a forward nor sampling (ModelRunner.busy_s).
    idle = {r["rank"]: 1 - (r.pop("busy_s") - busy_before[r["rank"]]) / elapsed for r in stats["ranks"]}
    report = {
        "engine": str(llm.engine.path), "tp": plan.tp, "pp": plan.pp, "dtype": plan.dtype,
        "isl": isl, "osl": osl, "num_requests": len(outputs), "concurrency": concurrency,
        "request_rate": request_rate, "duration_s": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + isl * len(outputs)) / elapsed,
        "requests_per_s": len(outputs) / elapsed,
        "ttft_ms": percentiles(ttft, 1e3),
        "tpot_ms": percentiles(tpot, 1e3),
        "steps": len(timings),
        "overlap": llm.coordinator.overlap,
        "micro_batches": llm.coordinator.micro_batches,
        "steps_launched_ahead": sum(t.launched_ahead for t in timings) / max(1, len(timings)),
        "max_running": busiest,
        "step_overhead_ms": {
            "schedule_and_pack": percentiles([t.schedule_s for t in timings], 1e3),
            "broadcast": percentiles([t.broadcast_s for t in timings], 1e3),
            "total_at_max_running": statistics.fmean(
                [t.schedule_s + t.broadcast_s for t in timings if t.running == busiest] or [0.0]) * 1e3,
            "share_of_step_time": sum(t.schedule_s + t.broadcast_s for t in timings)
            / max(1e-9, sum(t.step_s for t in timings)),
        },
        "device": llm.device,
        "cuda_graphs": stats["cuda_graphs"],
        "kv_cache": {"blocks": stats["kv_blocks"], "block_size": stats["kv_block_size"], "tokens": stats["kv_tokens"],
                     "peak_blocks_used": stats["kv_blocks_peak"],
                     "peak_usage": stats["kv_blocks_peak"] / stats["kv_blocks"]},
        "all_reduce": getattr(llm.coordinator.runner.comm, "tuning", None),  # NCCL's one-shot choice, on GPUs
        "preemptions": stats["preemptions"],
        "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"],
        "peak_memory_bytes": {f"rank{r['rank']}": r for r in stats["ranks"]},
        "idle_fraction": {f"rank{rank}": value for rank, value in idle.items()},
    }
    if plan.pp > 1:  # the pipeline bubble: the ranks' idle shares, averaged
        report["bubble_fraction"] = sum(idle.values()) / len(idle)
    if llm.device != "cpu":
        report["gpu_idle_fraction"] = idle[0]
    return report
