"""Kernel tuning at build time: for every GEMM and the decode attention of the engine's
shapes (one rank's slices; every rank of a plan has the same), time the candidate kernels on
this machine's GPU and return the winners with their measured times, for engine.json.

- Decode attention: the split count (flash-decoding), BLOCK_N and num_warps of the paged
  kernel, per batch-size bucket, over a short and the longest context; with one query head
  per KV head, its vector variant too; over an fp8 cache, its fp8 products too. Where another
  launch wins clearly at the short context alone, it is kept too, for steps that short.
- GEMMs of decode batches up to 16 rows: cuBLAS (F.linear; for int8 weights, dequantize and
  F.linear; for fp8 ones, _scaled_mm on rows already quantized, as the fused kernel before it
  hands them over) against the Triton skinny kernel's configurations (for quantized weights,
  reading them as they are). Larger batches have no Triton alternative here and take cuBLAS.
- fp8 GEMMs, at every decode bucket and a prefill chunk's rows: _scaled_mm accumulating in
  float32 against its fast accumulation (on an H200, 8-16% faster at 1,024 rows, and from 4%
  slower to 11% faster at 8,192, by shape).
- Prefill attention: the paged prefill kernel's tile and warps, over a step of max_num_tokens
  tokens (whole prompts of max_seq_len, and a chunk after cached keys).

Every time comes from replaying a CUDA graph of repeated calls (the runner replays graphs, so
launch overhead is not what is being chosen between), over rotated inputs of at least
L2_FLUSH_BYTES so that no timing reads a warm L2 cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dist_runtime import kernels
from dist_runtime.config import ModelConfig
from dist_runtime.cuda_graphs import buckets, replay_ms
from dist_runtime.engine import TuningRecord
from dist_runtime.layers.linear import linear
from dist_runtime.layers.quantized import fp8_input, fp8_linear
from dist_runtime.models import build_model
from dist_runtime.plan import DTYPES, Plan
from dist_runtime.quantization import INT4_DTYPES, QUANTIZED_DTYPES, quantize_weight
from dist_runtime.tuning import gemm_key, skipped

TUNING_CACHE_ENV = "DIST_RUNTIME_TUNING_CACHE"
L2_FLUSH_BYTES = 256 << 20
MAX_KV_TOKENS = 1 << 20  # per attention timing: a batch of 512 is timed at contexts of up to 2048
SHORT_CONTEXT = 256
SPLITS, BLOCK_NS, WARPS = (1, 2, 4, 8, 16), (32, 64, 128), (4, 8)
# the vector kernel (one query head per KV head) holds [BLOCK_N, head_dim] in float32; with fewer
# warps per program, more programs fit an SM (2 warps win every GPT-J shape timed alone on an H200)
VECTOR_BLOCK_NS, VECTOR_WARPS = (16, 32, 64), (2, 4)
# The tensor-core loop is software-pipelined 3 deep by default. Alone on an H200 (Llama-3-8B, fp8
# cache), 2 deep at 128 tokens and 4 warps is 17-22% faster at contexts of 1,152-2,110 and slower
# at 192; 1 (no pipelining) takes the fewest registers. The tuning weighs them (for Llama-3-8B it
# picks 2 deep from batch 256 up, which makes 2048/128 8.5% faster: BENCHMARKS.md).
PIPELINE_DEPTHS, PIPELINED_BLOCK_NS = (1, 2), (64, 128)
# E4M3 converted as loaded (convert_on_load), alone on an H200 (Llama-3-8B): at batch 1024 and
# contexts of 192-320, 9-11% faster than the best launch without; at 1,152-2,110, 8-10% slower than
# 128 tokens pipelined 2 deep without. The tuning weighs both.
# fp8 products (the keys as stored, q in two E4M3 parts), alone on an H200 (Llama-3-8B, fp8 cache):
# 21-32% faster than the best launch without at batches 64-1024 and contexts 192-2,110; 11% at 8 x 256.
# A launch that wins at the short context alone by this margin is kept beside the overall winner,
# for decode steps whose contexts are all that short (the runner captures graphs for both). On an
# H200 (Llama-3-8B, fp8 engine) one is kept at batches 1-32 (batch 1: 4.27 against 5.50 us);
# from 64 up, the overall winner (128 tokens a tile) is also the fastest at 256.
SHORT_MARGIN = 0.95
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the paged prefill kernel. On an H200 the fastest of
# these alone is also the fastest between fp8 GEMMs, at the power limit's lower clock (BENCHMARKS.md):
# the tuning, run on an idle GPU, picks what the engine's steps would.
PREFILL_LAUNCHES = ((64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 4, 2), (128, 64, 8, 2),
                    (128, 128, 8, 2))
TRITON_MARGIN = 0.97  # Triton must beat cuBLAS by 3%: a smaller gap is within the timing spread
FAST_MARGIN = 0.97  # and fp8's fast accumulation the float32 one, which is a little more exact
SKINNY_ROWS = 16  # the most rows the Triton skinny GEMM is timed at
CALLS = 16  # per graph
REPLAYS = 3


def tune_kernels(config: ModelConfig, plan: Plan, cache: Path | None = None) -> TuningRecord:
    """The tuning record for engine.json, or a record of why none was made. The winners are kept
    in `cache` (default: tuning_cache()) by what decided them: the GPU model, the versions, the
    shapes and sizes timed, and the tuner's and kernels' own source. A build of the same shapes
    on the same kind of GPU takes them from there at once."""
    if not torch.cuda.is_available():
        return skipped("no CUDA GPU on the build machine")
    import triton

    start = time.perf_counter()
    dtype = DTYPES[plan.dtype][0]
    gemms, attention = _shapes(config, plan, dtype)
    batches = sorted({b for b in buckets(plan.max_batch_size) if b & (b - 1) == 0} | {plan.max_batch_size})
    key = _cache_key(torch.cuda.get_device_name(), torch.__version__, triton.__version__, sorted(gemms), attention,
                     batches, plan.dtype, plan.kv_cache_dtype, plan.max_seq_len, plan.max_num_tokens, plan.block_size)
    file = (cache or tuning_cache()) / f"{key}.json"
    if file.is_file():
        try:
            record = TuningRecord.from_dict(json.loads(file.read_text()))
        except ValueError:  # unreadable (a crash mid-write, a hand edit): tune again and overwrite it
            pass
        else:
            record.reused_from = str(file)
            return record
    record = _tune(gemms, attention, batches, plan, dtype, triton.__version__)
    record.seconds = round(time.perf_counter() - start, 1)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.to_dict()))
    tmp.replace(file)
    return record


def tuning_cache() -> Path:
    return Path(os.environ.get(TUNING_CACHE_ENV) or Path.home() / ".cache" / "dist-runtime" / "tuning")


def _cache_key(*decided_by: Any) -> str:
    """sha256 of what decides the winners, the tuner's and the kernels' source among it."""
    sources = [Path(__file__), *sorted((Path(kernels.__file__).parent).glob("*.py"))]
    digest = hashlib.sha256(json.dumps(decided_by, default=str).encode())
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:24]


def _tune(gemms: set, attention: tuple, batches: list[int], plan: Plan, dtype: torch.dtype,
          triton_version: str) -> TuningRecord:
    with torch.inference_mode():
        record = TuningRecord(True, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                              triton=triton_version,
                              decode_attention=_tune_attention(attention, batches, plan, dtype),
                              gemm=_tune_gemms(gemms, sorted({*batches, plan.max_num_tokens}), dtype, plan.dtype))
        if dtype in (torch.bfloat16, torch.float16):  # float32 queries keep the small exact tile (launch_for)
            record.prefill_attention = _tune_prefill(attention, plan, dtype)
    torch.cuda.empty_cache()
    return record


def _shapes(config: ModelConfig, plan: Plan, dtype: torch.dtype) -> tuple[set, tuple]:
    """GEMM shapes (out, in, has bias, quantized in a quantized engine: not the LM head) of every
    stage, and the attention shape (our models' layers share one but for their window: where
    local and global layers alternate, as in Gemma, a global one's, which reads the most keys)."""
    gemms, attention = set(), None
    for stage in range(plan.pp):
        model = build_model(config, plan.mapping(stage * plan.tp), plan.layer_range(stage), dtype, "meta")
        for module in model.modules():
            if not hasattr(module, "kernels"):
                continue
            if hasattr(module, "k_cache"):
                if attention is None or module.sliding_window is None:
                    attention = (module.num_heads, module.num_kv_heads, module.head_dim, module.sliding_window)
            elif not (plan.dtype in INT4_DTYPES and module.weight.is_linear_weight):  # int4: its own kernel always
                gemms.add((*module.weight.shape, module.bias is not None, module.weight.is_linear_weight))
    return gemms, attention


def gpu_time(fns: list[Callable[[], Any]]) -> float:
    """Seconds per call of the fns (taken in turn), from CUDA-graph replays; the median of REPLAYS."""
    for fn in fns:
        fn()  # compile, warm up, and raise here (outside any capture) if a configuration cannot run
    torch.cuda.synchronize()
    rounds = max(1, CALLS // len(fns))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for fn in fns:
                fn()
    return replay_ms(graph, 1, REPLAYS) / 1e3 / (rounds * len(fns))


def _try_time(fns: list[Callable[[], Any]]) -> float:
    """gpu_time, or infinity for a configuration that cannot run here (too much shared memory, or
    no cuBLAS kernel)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    try:
        return gpu_time(fns)
    except (OutOfResources, CompilationError):
        return math.inf
    except RuntimeError as error:  # cuBLAS without a kernel for it (fast fp8 accumulation at some shapes)
        if "CUBLAS_STATUS_NOT_SUPPORTED" not in str(error):
            raise
        return math.inf


def _paged_cache(seqs: int, per_seq: int, kv_heads: int, head_dim: int, plan: Plan,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Random keys and values in the plan's cache layout, and up to 4 block tables of `seqs`
    sequences of `per_seq` blocks each, drawn at random from a pool of at least L2_FLUSH_BYTES:
    calls taking the tables in turn find none of their blocks in the L2 cache."""
    bs = plan.block_size
    block_bytes = 2 * bs * kv_heads * head_dim * plan.kv_dtype.itemsize
    pool = max(seqs * per_seq, L2_FLUSH_BYTES // block_bytes)
    k_cache = torch.randn(pool, bs, kv_heads, head_dim, device="cuda", dtype=dtype).to(plan.kv_dtype)
    v_cache = torch.randn_like(k_cache, dtype=dtype).to(plan.kv_dtype)
    rotations = max(1, min(4, pool // (seqs * per_seq)))
    tables = [torch.randperm(pool, device="cuda")[: seqs * per_seq].view(seqs, per_seq) for _ in range(rotations)]
    return k_cache, v_cache, tables


def _tune_attention(shape: tuple, batches: list[int], plan: Plan, dtype: torch.dtype) -> dict[str, Any]:
    from dist_runtime.kernels.paged_decode import DEFAULT, fp8_products_fit, paged_decode_attention

    heads, kv_heads, head_dim, window = shape
    bs = plan.block_size
    ones = torch.ones(kv_heads, device="cuda")
    kv_scales = {"k_scale": ones, "v_scale": ones} if plan.kv_cache_dtype == "fp8" else {}
    contexts = sorted({min(SHORT_CONTEXT, plan.max_seq_len), plan.max_seq_len})
    # Over an fp8 cache with bf16 queries, the products are taken in float16: faster at every
    # Llama-3-8B shape timed alone on an H200 (8-11% at batches of 64 to 1024), and closer. The
    # default launch stays a candidate: its time is the untuned engine's.
    f16 = {"f16": True} if plan.kv_cache_dtype == "fp8" and dtype == torch.bfloat16 else {}
    candidates = [DEFAULT] * bool(f16) + [dict(splits=s, block_n=n, num_warps=w, **f16)
                                          for s, n, w in itertools.product(SPLITS, BLOCK_NS, WARPS)]
    conversions = [{}, {"convert_on_load": True}] if f16 else [{}]
    candidates += [dict(splits=s, block_n=n, num_warps=4, num_stages=d, **f16, **c)
                   for s, n, d, c in itertools.product(SPLITS, PIPELINED_BLOCK_NS, PIPELINE_DEPTHS, conversions)]
    if fp8_products_fit(dtype, heads // kv_heads, head_dim, plan.kv_cache_dtype == "fp8"):
        candidates += [dict(splits=s, block_n=n, num_warps=4, num_stages=d, fp8_products=True)
                       for s, n, d in itertools.product(SPLITS, PIPELINED_BLOCK_NS, PIPELINE_DEPTHS)]
    if heads == kv_heads:
        candidates += [dict(splits=s, block_n=n, num_warps=w, vector=True)
                       for s, n, w in itertools.product(SPLITS, VECTOR_BLOCK_NS, VECTOR_WARPS)]
    table = {}
    for b in batches:
        times: dict[int, list[float]] = {i: [] for i in range(len(candidates))}
        used_contexts = []
        for context in contexts:
            context = max(1, min(context, MAX_KV_TOKENS // b))
            used_contexts.append(context)
            k_cache, v_cache, tables = _paged_cache(b, -(-context // bs), kv_heads, head_dim, plan, dtype)
            q = torch.randn(b, heads, head_dim, device="cuda", dtype=dtype)
            lens = torch.full((b,), context, device="cuda", dtype=torch.int64)
            launches = [[partial(paged_decode_attention, q, k_cache, v_cache, t, lens, head_dim**-0.5, window, **c,
                                 **kv_scales) for t in tables] for c in candidates]
            expected = launches[candidates.index(DEFAULT)][0]().float()
            for i, fns in enumerate(launches):
                time_taken = _try_time(fns)  # a launch that ran here is also held to the default's output
                times[i].append(time_taken if time_taken == math.inf or _agrees(fns[0](), expected) else math.inf)
        # the geometric mean over the contexts: each context weighs the same, however long
        score = {i: math.prod(t) for i, t in times.items()}
        best = min(score, key=score.get)
        default = next(i for i, c in enumerate(candidates) if c == DEFAULT)
        table[str(b)] = {**candidates[best], "contexts": used_contexts, "us": _us(times[best]),
                         "default_us": _us(times[default])}
        best_short = min(times, key=lambda i: times[i][0])
        if len(used_contexts) > 1 and times[best_short][0] < SHORT_MARGIN * times[best][0]:
            table[str(b)]["short"] = {**candidates[best_short], "context": used_contexts[0],
                                      "us": _us(times[best_short][:1])}
    return table


def _prefill_step(plan: Plan) -> list[tuple[int, int]]:
    """(new tokens, context) of the sequences of a full prefill step: as many whole prompts of
    max_seq_len as max_num_tokens holds, and the rest as the last chunk of one more prompt."""
    length = min(plan.max_seq_len, plan.max_num_tokens)
    full_prompts, rest = divmod(plan.max_num_tokens, length)
    return [(length, length)] * full_prompts + [(rest, length)] * bool(rest)


def _tune_prefill(shape: tuple, plan: Plan, dtype: torch.dtype) -> dict[str, Any]:
    from dist_runtime.kernels.paged_prefill import launch_for, paged_prefill_attention, prefill_tiles

    heads, kv_heads, head_dim, window = shape
    bs, fp8 = plan.block_size, plan.kv_cache_dtype == "fp8"
    seqs = _prefill_step(plan)
    starts = [0, *itertools.accumulate(new for new, _ in seqs)]
    contexts = [ctx for _, ctx in seqs]
    k_cache, v_cache, tables = _paged_cache(len(seqs), -(-max(contexts) // bs), kv_heads, head_dim, plan, dtype)
    scales = (torch.ones(kv_heads, device="cuda"),) * 2 if fp8 else (None, None)
    q = torch.randn(starts[-1], heads, head_dim, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    query_start = torch.tensor(starts, device="cuda", dtype=torch.int32)
    lens = torch.tensor(contexts, device="cuda", dtype=torch.int32)
    default = launch_for(head_dim, fp8, dtype)
    candidates = [default] + [c for c in PREFILL_LAUNCHES if c != default and (c[1] % bs == 0 or bs % c[1] == 0)]

    def launches(launch):
        tiles = torch.from_numpy(prefill_tiles(starts, contexts, 0, launch[0])).cuda()
        return [partial(paged_prefill_attention, q, k_cache, v_cache, t, tiles, query_start, lens, head_dim**-0.5,
                        window, out, *scales, launch) for t in tables]

    expected = launches(default)[0]().float()
    times = []
    for launch in candidates:
        fns = launches(launch)
        time_taken = _try_time(fns)  # and, like decode attention's, held to the default launch's output
        times.append(time_taken if time_taken == math.inf or _agrees(fns[0](), expected) else math.inf)
    best = min(range(len(candidates)), key=times.__getitem__)
    return {"launch": list(candidates[best]), "tokens": starts[-1], "us": _us([times[best]])[0],
            "default_us": _us([times[0]])[0]}


def _agrees(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a launch's output is the default launch's (within the products' rounding): a
    launch that a compiler gets wrong on this machine is never picked."""
    return bool(((out.float() - expected).norm() <= 0.02 * expected.norm()).item())


def _random_weight(n: int, k: int, dtype: torch.dtype, fmt: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, scale per row): a quantized one with its scales for int8wo and fp8, else (dtype, None)."""
    weight = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    return quantize_weight(weight, fmt) if fmt in QUANTIZED_DTYPES else (weight, None)


def _tune_gemms(shapes: set, rows: list[int], dtype: torch.dtype, fmt: str) -> dict[str, Any]:
    """Per GEMM shape and row count: Triton or cuBLAS up to SKINNY_ROWS rows, and for fp8
    weights whether _scaled_mm accumulates fast, at every count."""
    if dtype not in (torch.bfloat16, torch.float16):
        return {}  # Triton's float32 dot is tf32 unless made exact, and then slow: cuBLAS it is
    table = {}
    for n, k, has_bias, quantizable in sorted(shapes):
        weight_fmt = fmt if quantizable else None  # the LM head stays in dtype
        weight_bytes = 1 if weight_fmt in QUANTIZED_DTYPES else dtype.itemsize
        copies = min(CALLS, -(-L2_FLUSH_BYTES // (n * k * weight_bytes)))
        weights = [_random_weight(n, k, dtype, weight_fmt) for _ in range(copies)]
        bias = torch.randn(n, device="cuda", dtype=dtype) if has_bias else None
        counts = rows if weight_fmt == "fp8" else [m for m in rows if m <= SKINNY_ROWS]
        entry = {str(m): _tune_gemm(m, k, weights, bias, dtype, weight_fmt) for m in counts}
        if entry:
            table[gemm_key(n, k)] = entry
    return table


def _tune_gemm(m: int, k: int, weights: list, bias: torch.Tensor | None, dtype: torch.dtype,
               weight_fmt: str | None) -> dict[str, Any]:
    from dist_runtime.kernels.skinny_gemm import CONFIGS, ROW_CONFIGS, skinny_linear

    x = torch.randn(m, k, device="cuda", dtype=dtype)
    choice = {}
    if weight_fmt == "fp8":
        rows_in = fp8_input(x, None)
        float32_sum_time = _try_time([partial(fp8_linear, rows_in, w, s, bias=bias) for w, s in weights])
        fast_sum_time = _try_time([partial(fp8_linear, rows_in, w, s, bias=bias, fast_accumulate=True)
                                   for w, s in weights])
        choice = {"fast_accumulate": fast_sum_time < FAST_MARGIN * float32_sum_time,
                  "cublas_fast_us": _us([fast_sum_time])[0]}
        cublas_time = fast_sum_time if choice["fast_accumulate"] else float32_sum_time
    else:
        float32_sum_time = cublas_time = _try_time([partial(linear, x, w, bias, scale=s) for w, s in weights])
    choice = {"kernel": "cublas", "us": _us([cublas_time])[0], **choice, "cublas_us": _us([float32_sum_time])[0]}
    if m > SKINNY_ROWS:
        return choice
    configs = CONFIGS + ROW_CONFIGS if m == 1 else CONFIGS
    triton_times = [_try_time([partial(skinny_linear, x, w, bias, *c, scale=s) for w, s in weights]) for c in configs]
    best = min(range(len(configs)), key=triton_times.__getitem__)
    choice["best_triton_us"] = _us([triton_times[best]])[0]
    if triton_times[best] < TRITON_MARGIN * cublas_time:
        block_n, block_k, num_warps, num_stages = configs[best]
        choice.update(kernel="triton", block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                      us=choice["best_triton_us"])
    return choice


def _us(seconds: list[float]) -> list[float]:
    return [round(s * 1e6, 2) for s in seconds]
