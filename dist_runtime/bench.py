"""`dist-runtime bench`: a synthetic workload through the LLM API, measured.

Prompts are random token ids of `isl` tokens; every request generates exactly `osl` tokens
(greedy, end-of-sequence ignored). Requests go in all at once (the default: maximum
throughput), `concurrency` at a time, or arriving as a Poisson process at `request_rate`.
"""

from __future__ import annotations

import random
import statistics
import time

import numpy as np
from tqdm import tqdm

from dist_runtime.llm import LLM
from dist_runtime.sampling_params import SamplingParams


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    a = np.asarray(values) * scale
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def run_bench(llm: LLM, isl: int, osl: int, num_requests: int, concurrency: int | None = None,
              request_rate: float | None = None, seed: int = 0, progress: bool = False) -> dict:
    rng = random.Random(seed)
    vocab = llm.engine.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(isl)] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[0][: max(1, isl // 2)]], SamplingParams(max_tokens=2, temperature=0.0))  # warm up
    first_step = len(llm.coordinator.timings)
    limit = concurrency or num_requests
    bar = tqdm(total=num_requests, unit="req", desc="bench", disable=not progress)
    start = time.perf_counter()
    pending, in_flight, outputs = list(prompts), [], []
    next_arrival = start
    while pending or in_flight:
        now = time.perf_counter()
        while pending and len(in_flight) < limit and now >= next_arrival:
            in_flight.append(llm.submit(pending.pop(0), params))
            if request_rate:
                next_arrival += rng.expovariate(request_rate)
        done = [h for h in in_flight if h.done.is_set()]
        for h in done:
            in_flight.remove(h)
            outputs.append(h.result())
        bar.update(len(done))
        if not done:
            time.sleep(0.0005)
    elapsed = time.perf_counter() - start
    bar.close()
    return _report(llm, outputs, elapsed, isl, osl, concurrency, request_rate, first_step)


def _report(llm: LLM, outputs: list, elapsed: float, isl: int, osl: int, concurrency, request_rate,
            first_step: int) -> dict:
    ttft = [o.first_token_time - o.arrival_time for o in outputs]
    tpot = [(o.finish_time - o.first_token_time) / (len(o.token_ids) - 1) for o in outputs if len(o.token_ids) > 1]
    generated = sum(len(o.token_ids) for o in outputs)
    timings = llm.coordinator.timings[first_step:]
    busiest = max((t.running for t in timings), default=0)
    stats = llm.stats()
    plan = llm.engine.plan
    return {
        "engine": str(llm.engine.path), "tp": plan.tp, "pp": plan.pp, "dtype": plan.dtype,
        "isl": isl, "osl": osl, "num_requests": len(outputs), "concurrency": concurrency,
        "request_rate": request_rate, "duration_s": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + isl * len(outputs)) / elapsed,
        "requests_per_s": len(outputs) / elapsed,
        "ttft_ms": percentiles(ttft, 1e3),
        "tpot_ms": percentiles(tpot, 1e3),
        "steps": len(timings),
        "max_running": busiest,
        "step_overhead_ms": {
            "schedule_and_pack": percentiles([t.schedule_s for t in timings], 1e3),
            "broadcast": percentiles([t.broadcast_s for t in timings], 1e3),
            "total_at_max_running": statistics.fmean(
                [t.schedule_s + t.broadcast_s for t in timings if t.running == busiest] or [0.0]) * 1e3,
            "share_of_step_time": sum(t.schedule_s + t.broadcast_s for t in timings)
            / max(1e-9, sum(t.step_s for t in timings)),
        },
        "kv_cache": {"blocks": stats["kv_blocks"], "block_size": stats["kv_block_size"],
                     "peak_blocks_used": stats["kv_blocks_peak"],
                     "peak_usage": stats["kv_blocks_peak"] / stats["kv_blocks"]},
        "preemptions": stats["preemptions"],
        "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"],
        "peak_memory_bytes": {f"rank{r['rank']}": r for r in stats["ranks"]},
    }
