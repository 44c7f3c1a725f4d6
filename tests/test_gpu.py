"""The GPU path against the CPU reference: the paged decode and prefill kernels over awkward
shapes (with an fp8 cache too), and whole engines (float32: the same tokens; bfloat16: the same
first tokens). Skipped without CUDA."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import PROMPTS, assert_gpu_follows_cpu_reference, assert_gpu_gives_cpu_tokens, quantize_cache

from dist_runtime import LLM, SamplingParams
from dist_runtime.layers.attention import AttentionMetadata, PagedAttention
from dist_runtime.model_runner import _leading_decodes
from dist_runtime.quantization import FP8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8_KV = pytest.param("fp8", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="Triton's fp8 (E4M3) casts need compute capability 8.9+"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("kv", ["auto", FP8_KV])
@pytest.mark.parametrize("launch", [{}, {"splits": 3, "block_n": 32, "num_warps": 8},
                                    {"splits": 16, "block_n": 128, "num_warps": 4},
                                    {"vector": True, "block_n": 16}, {"vector": True, "splits": 3, "block_n": 64,
                                                                       "num_warps": 8},
                                    {"f16": True}, {"f16": True, "splits": 3, "block_n": 32, "num_warps": 8},
                                    {"f16": True, "num_stages": 2, "block_n": 128},
                                    {"num_stages": 1, "splits": 3, "block_n": 64},
                                    {"f16": True, "convert_on_load": True, "num_stages": 1},
                                    {"f16": True, "convert_on_load": True, "splits": 3, "block_n": 128,
                                     "num_stages": 2},
                                    {"fp8_products": True, "num_stages": 1},
                                    {"fp8_products": True, "splits": 3, "block_n": 128, "num_stages": 2}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window", [
    (4, 4, 16, 16, None), (8, 2, 64, 16, None), (32, 8, 128, 16, None), (8, 1, 128, 8, None),
    (16, 16, 256, 32, None), (8, 2, 64, 16, 7), (4, 4, 64, 16, 7), (8, 8, 96, 16, None)])
def test_paged_decode_kernel_matches_the_reference(dtype, heads, kv_heads, head_dim, block_size, window, launch,
                                                   kv):
    """Every launch the tuner may pick: one split, and flash-decoding splits (more splits than
    a short context has chunks, so some are empty). Each KV head has its own range; an fp8 cache
    has a scale per KV head, and the kernel on it is also held to the unquantized reference."""
    from dist_runtime.kernels.paged_decode import fp8_products_fit, paged_decode_attention

    if launch.get("vector") and heads != kv_heads:
        pytest.skip("the vector kernel takes one query head per KV head")
    if launch.get("f16") and (kv != "fp8" or dtype != torch.bfloat16):
        pytest.skip("float16 products are for an fp8 cache and bfloat16 queries")
    if launch.get("fp8_products") and not fp8_products_fit(dtype, heads // kv_heads, head_dim, kv == "fp8"):
        pytest.skip("fp8 products are for an fp8 cache, bfloat16 queries, groups of 4 or fewer, heads of 32+")
    torch.manual_seed(0)
    context = [1, 2, block_size - 1, block_size, block_size + 1, 100, 257]
    max_blocks = -(-max(context) // block_size)
    num_blocks = len(context) * max_blocks + 3
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim**-0.5, window)
    spread = torch.linspace(0.5, 4, kv_heads, device="cuda", dtype=dtype)[:, None]
    attn.k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype) * spread
    attn.v_cache = torch.randn_like(attn.k_cache) * spread
    tables = torch.randperm(num_blocks, device="cuda")[: len(context) * max_blocks].view(len(context), max_blocks)
    tables = tables.to(torch.int32)
    q = torch.randn(len(context), heads, head_dim, device="cuda", dtype=dtype)
    ctx = torch.tensor(context, device="cuda", dtype=torch.int32)
    meta = AttentionMetadata(torch.empty(0), list(range(len(context) + 1)), context, tables.long())
    if kv == "fp8":
        unquantized = attn.reference(q, meta)
        quantize_cache(attn)
    from triton.runtime.errors import OutOfResources

    try:
        out = paged_decode_attention(q, attn.k_cache, attn.v_cache, tables, ctx, attn.scale, window, **launch,
                                     k_scale=attn.k_scale, v_scale=attn.v_scale)
    except OutOfResources:
        pytest.skip("this tile needs more shared memory than the GPU has (the tuner skips such launches too)")
    ref = attn.reference(q.double(), meta) if dtype == torch.float32 else attn.reference(q, meta)
    err = rel_err(out, ref)
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    if kv == "fp8":  # E4M3 keeps 3 mantissa bits: 3 to 6% off the unquantized attention
        assert rel_err(out, unquantized) < 0.1


@pytest.mark.parametrize("kv", ["auto", FP8_KV])
@pytest.mark.parametrize("launch", [None, (16, 16, 4, 1), (64, 32, 4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window", [
    (4, 4, 16, 16, None), (32, 8, 128, 16, None), (8, 1, 128, 8, None), (16, 16, 256, 32, None),
    (8, 2, 64, 16, 37), (4, 4, 64, 16, 5), (8, 8, 96, 16, 37)])
def test_paged_prefill_kernel_matches_the_reference(dtype, heads, kv_heads, head_dim, block_size, window, launch, kv):
    """Decodes in front (left alone), fresh prompts, chunks after cached keys, a one-token
    chunk: their rows of the output against the reference, which reads the same cache."""
    from triton.runtime.errors import OutOfResources

    from dist_runtime.kernels.paged_prefill import (
        fp8_scores_fit,
        launch_for,
        paged_prefill_attention,
        prefill_tiles,
        round_q_e4m3,
    )

    if head_dim == 16 and launch is not None and launch[0] > 16:
        pytest.skip("one launch per head size is enough here")
    if dtype == torch.float32 and launch is not None and launch[0] > 16:
        pytest.skip("float32 takes the default launch (launch_for)")
    torch.manual_seed(0)
    seqs = [(1, 9), (1, 300), (300, 300), (5, 5), (129, 129), (64, 200), (200, 600), (1, 20), (17, 17)]
    max_blocks = -(-max(ctx for _, ctx in seqs) // block_size)
    num_blocks = len(seqs) * max_blocks + 3
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim**-0.5, window)
    spread = torch.linspace(0.5, 4, kv_heads, device="cuda", dtype=dtype)[:, None]
    attn.k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype) * spread
    attn.v_cache = torch.randn_like(attn.k_cache) * spread
    tables = torch.randperm(num_blocks, device="cuda")[: len(seqs) * max_blocks].view(len(seqs), max_blocks)
    starts = [0]
    for new, _ in seqs:
        starts.append(starts[-1] + new)
    context = [ctx for _, ctx in seqs]
    meta = AttentionMetadata(torch.empty(0), starts, context, tables)
    q = torch.randn(starts[-1], heads, head_dim, device="cuda", dtype=dtype)
    if kv == "fp8":
        unquantized = attn.reference(q, meta)
        quantize_cache(attn)
    launch = launch or launch_for(head_dim, kv == "fp8", dtype)
    tiles = torch.from_numpy(prefill_tiles(starts, context, 2, launch[0])).cuda()
    out = torch.full_like(q, 7.0)
    try:
        paged_prefill_attention(q, attn.k_cache, attn.v_cache, tables, tiles,
                                torch.tensor(starts, device="cuda", dtype=torch.int32),
                                torch.tensor(context, device="cuda", dtype=torch.int32), attn.scale, window, out,
                                attn.k_scale, attn.v_scale, launch)
    except OutOfResources:
        pytest.skip("this tile needs more shared memory than the GPU has")
    if kv == "fp8":  # E4M3 keys and values (and q, rounded so for the fp8 scores): 3 to 8% off
        assert rel_err(out[2:], unquantized[2:]) < 0.12
    if kv == "fp8" and dtype != torch.float32 and fp8_scores_fit(head_dim):
        q = round_q_e4m3(q).to(dtype)  # the scores take q rounded so; no more error than that is allowed
    ref = attn.reference(q.double(), meta) if dtype == torch.float32 else attn.reference(q, meta)
    assert (out[:2] == 7.0).all()
    err = rel_err(out[2:], ref[2:])
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


@pytest.mark.parametrize("arch", ["llama", "gptj", "mistral"])
def test_gpu_float32_engine_gives_the_cpu_tokens(arch, engines):
    engine = str(engines(arch, 1, 1, max_seq_len=256, max_num_tokens=32))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with LLM(engine) as cpu:
        expected = [o.token_ids for o in cpu.generate(PROMPTS, params)]
    with LLM(engine, device="cuda") as gpu:
        assert gpu.coordinator.runner.graphs is not None
        assert [o.token_ids for o in gpu.generate(PROMPTS, params)] == expected
        # requests joining a running batch, chunked prefill and prefix hits take the other GPU paths
        handles = []
        for prompt in PROMPTS * 2:
            handles.append(gpu.submit(prompt, params))
            while not (handles[-1].seqs and handles[-1].seqs[0].num_output >= 1):
                pass
        assert [h.result().token_ids for h in handles] == expected * 2


def test_gpu_overlap_with_cuda_graphs_gives_the_synchronous_tokens(engines):
    """Decode steps launched before the last step's ids reach the host take them from the
    graph's output on the device: greedy, seeded, stop tokens seen one step late, and requests
    joining a decoding batch must all give the tokens of the synchronous path."""
    from dist_runtime.bench import run_bench

    engine = str(engines("llama", 1, 1, max_seq_len=256, max_num_tokens=32))
    prompts = PROMPTS * 2
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    results, idle = [], []
    for overlap in (False, True):
        with LLM(engine, device="cuda", overlap=overlap) as llm:
            assert llm.coordinator.runner.graphs is not None and llm.coordinator.overlap == overlap
            outs = [o.token_ids for o in llm.generate(prompts, params)]
            stops = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[t[2 + i % 3]])
                     for i, t in enumerate(outs)]
            outs += [o.token_ids for o in llm.generate(prompts, stops)]
            handles = []
            for prompt, sp in zip(prompts, params):
                handles.append(llm.submit(prompt, sp))
                while not (handles[-1].seqs and handles[-1].seqs[0].num_output >= 2):
                    pass
            outs += [h.result(timeout=60).token_ids for h in handles]
            assert any(t.launched_ahead for t in llm.coordinator.timings) == overlap
            results.append(outs)
            report = run_bench(llm, isl=16, osl=32, num_requests=4, concurrency=1)
            assert report["overlap"] == overlap and 0 <= report["gpu_idle_fraction"] < 1
            assert not any(k.startswith("paged_decode.") for k in report["kernels_compiled_in_run"])
            idle.append(report["gpu_idle_fraction"])
    assert results[0] == results[1]
    print(f"GPU idle fraction at batch 1: {idle[0]:.1%} without overlap, {idle[1]:.1%} with")


def test_bench_reports_the_gpus_clock_and_power_over_the_run(engines):
    """What NVML read while the timed run went: the figures that say whether the GPU ran at its
    clock or was held down by its power limit."""
    pytest.importorskip("pynvml")
    from dist_runtime.bench import run_bench

    with LLM(str(engines("llama", 1, 1, max_seq_len=256, max_num_tokens=32)), device="cuda") as llm:
        clocks = run_bench(llm, isl=16, osl=64, num_requests=8)["gpu_clocks"]
    assert clocks["gpu"] == torch.cuda.get_device_name()
    assert clocks["samples"] >= 1
    assert 0 < clocks["sm_clock_mhz"]["min"] <= clocks["sm_clock_mhz"]["max"] <= clocks["max_sm_clock_mhz"]
    assert 0 < clocks["power_w"]["mean"] <= clocks["power_w"]["max"] and clocks["power_limit_w"] > 0
    assert 0 <= clocks["power_capped_share"] <= 1 and 0 <= clocks["thermal_slowdown_share"] <= 1


def test_mixed_steps_compile_no_decode_attention_kernel_the_graphs_lack(engines):
    """A prompt's chunk beside decoding sequences runs eagerly; its decode attention must find
    the kernel compiled when the decode graphs were captured, or every request waits for a
    compile in the middle of a run (3 such compiles showed in one Llama-3-8B bench)."""
    from dist_runtime.kernels import compiled_variants

    engine = str(engines("llama", 1, 1, dtype="bf16", max_seq_len=256, max_num_tokens=32))

    def compiled() -> dict[str, int]:
        return {name: n for name, n in compiled_variants().items() if name.startswith("paged_decode.")}

    decode = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    with LLM(engine, device="cuda") as llm:
        captured = compiled()
        runner, mixed = llm.coordinator.runner, []

        def launch(step, original=runner.launch):  # notes the steps with decodes before a prompt's chunk
            if step.num_tokens > step.num_seqs and _leading_decodes(step.query_start):
                mixed.append(step.num_seqs)
            return original(step)

        runner.launch = launch
        for decoding in (1, 3):  # bucket 1 had its inputs misaligned; 3 takes bucket 4's kernel
            first = [llm.submit(p, decode) for p in PROMPTS[:decoding]]
            deadline = time.time() + 60  # polled with sleeps, as in test_overlap: a bare spin starves the engine thread
            while not all(h.seqs and h.seqs[0].num_output >= 2 for h in first) and time.time() < deadline:
                time.sleep(0.001)
            joining = llm.submit(list(range(10, 110)), SamplingParams(max_tokens=2, ignore_eos=True))
            for handle in [*first, joining]:
                handle.result(timeout=120)
    assert mixed, "no step had a prompt's chunk beside decoding sequences"
    assert compiled() == captured


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_gpu_bfloat16_engine_gives_the_cpu_tokens_but_at_near_ties(arch, engines):
    """Against the CPU running the same bf16 engine (the same rounded weights). Rounding may
    flip a greedy pick where two tokens are nearly tied: the sequences must agree up to a
    divergence, where each side's token is among the other's top 3."""
    engine = str(engines(arch, 1, 1, dtype="bf16"))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    with LLM(engine) as cpu:
        expected = cpu.generate(PROMPTS, params, return_logits=True)
    with LLM(engine, device="cuda") as gpu:
        got = gpu.generate(PROMPTS, params, return_logits=True)
    for ours, ref in zip(got, expected):
        a, b = ours.outputs[0].logits[0].cpu(), ref.outputs[0].logits[0]
        assert ((a - b).norm() / b.norm()).item() < 2e-2
        for step, (x, y) in enumerate(zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs)):
            if x.token_id != y.token_id:
                assert x.token_id in [t for t, _ in y.top] and y.token_id in [t for t, _ in x.top], (step, x, y)
                break


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out_features,in_features,bias", [
    (1, 1, 8, False), (1, 4096, 4096, False), (3, 17, 100, True), (16, 160, 512, False), (5, 6144, 4096, True),
    (16, 1000, 14336, False)])
@pytest.mark.parametrize("config", [(16, 256, 4, 4), (64, 128, 4, 4), (32, 512, 8, 3), (8, 512, 4, 3)])
def test_skinny_gemm_matches_f_linear(dtype, rows, out_features, in_features, bias, config):
    """The tensor-core kernel, and for one row the multiply-add kernel (block_n < 16)."""
    from dist_runtime.kernels.skinny_gemm import skinny_linear

    if config[0] < 16 and rows > 1:
        pytest.skip("block_n < 16 is the one-row kernel")

    torch.manual_seed(0)
    x = torch.randn(rows, in_features, device="cuda", dtype=dtype)
    w = torch.randn(out_features, in_features, device="cuda", dtype=dtype) / in_features**0.5
    b = torch.randn(out_features, device="cuda", dtype=dtype) if bias else None
    y = skinny_linear(x, w, b, *config)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert not y.isnan().any() and err < (1e-5 if dtype == torch.float32 else 1e-2), err


@pytest.mark.parametrize("rows,out_features,in_features,bias", [(1, 4096, 4096, False), (3, 17, 100, True),
                                                              (16, 1000, 14336, False)])
@pytest.mark.parametrize("config", [(16, 256, 4, 4), (32, 512, 8, 3), (8, 512, 4, 3)])
@pytest.mark.parametrize("fmt", ["int8wo", "fp8"])
def test_skinny_gemm_reads_quantized_weights_as_dequantizing_them_first_does(rows, out_features, in_features, bias,
                                                                             config, fmt):
    """Int8 and fp8 weights: converted in registers, each column scaled at the end, the bias
    after; against the dequantized weight in float64, and as the engine dispatches it (an fp8
    weight with x unquantized: weight-only)."""
    from dist_runtime.engine import TuningRecord
    from dist_runtime.kernels.skinny_gemm import skinny_linear
    from dist_runtime.layers.linear import linear
    from dist_runtime.quantization import dequantize_weight, quantize_weight
    from dist_runtime.tuning import KernelChoices

    if config[0] < 16 and rows > 1:
        pytest.skip("block_n < 16 is the one-row kernel")
    torch.manual_seed(0)
    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 casts need compute capability 8.9+")
    q, scale = quantize_weight(torch.randn(out_features, in_features, device="cuda") / in_features**0.5, fmt)
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(out_features, device="cuda", dtype=torch.bfloat16) if bias else None
    ref = x.double() @ dequantize_weight(q, scale).double().t() + (0 if b is None else b.double())
    got = skinny_linear(x, q, b, *config, scale=scale)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2
    block_n, block_k, num_warps, num_stages = config
    choice = {"kernel": "triton", "block_n": block_n, "block_k": block_k, "num_warps": num_warps,
              "num_stages": num_stages}
    kernels = KernelChoices(TuningRecord(True, gemm={f"{out_features}x{in_features}": {"16": choice}}))
    assert torch.equal(linear(x, q, b, kernels, scale), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,size", [(1, 64), (7, 4096), (33, 5000)])
def test_fused_add_rmsnorm_matches_the_reference(dtype, tokens, size):
    from dist_runtime.layers.norm import RMSNorm

    norm = RMSNorm(size, 1e-5).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x, residual = (torch.randn(tokens, size, device="cuda", dtype=dtype) for _ in range(2))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(norm(x), norm.reference(x), rtol=tol, atol=tol)
    fused, summed = norm(x, residual.clone())
    ref, ref_summed = norm.reference(x, residual.clone())
    assert torch.equal(summed, ref_summed) and torch.allclose(fused, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,size", [(1, 64), (7, 4096), (33, 5000)])
def test_fused_layernorm_matches_the_reference(dtype, tokens, size):
    from dist_runtime.layers.norm import LayerNorm

    norm = LayerNorm(size, 1e-5).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    torch.nn.init.normal_(norm.bias, 0.0, 0.1)
    x = torch.randn(tokens, size, device="cuda", dtype=dtype) * 3 + 1  # an offset that the mean removes
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(norm(x), norm.reference(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim,interleaved", [(16, 16, False), (128, 128, False), (16, 8, True),
                                                             (256, 64, True), (96, 96, False), (96, 48, False)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (5, 3)])
def test_fused_rotary_matches_the_reference(dtype, head_dim, rotary_dim, interleaved, heads, kv_heads):
    """One program rotates all of a token's heads (head counts that are not powers of two are
    padded inside it)."""
    from dist_runtime.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(head_dim, rotary_dim, 500000.0, None, interleaved).cuda()
    positions = torch.randint(0, 8000, (9,), device="cuda")
    q = torch.randn(9, heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(9, kv_heads, head_dim, device="cuda", dtype=dtype)
    ref_q, ref_k = rope.reference(positions, q.clone(), k.clone())
    got_q, got_k = rope(positions, q.clone(), k.clone())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got_q, ref_q, rtol=tol, atol=tol) and torch.allclose(got_k, ref_k, rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens,size", [(1, 160), (5, 14336)])
def test_fused_silu_and_mul_matches_the_reference(tokens, size):
    from dist_runtime.kernels.fused import silu_and_mul

    gate_up = torch.randn(tokens, 2 * size, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert torch.allclose(silu_and_mul(gate_up).float(), torch.nn.functional.silu(gate) * up, rtol=2e-2, atol=2e-2)


def test_nccl_communicator_reduces_and_gathers_inside_a_cuda_graph():
    """World size 1 (one GPU): the collectives run on torch's stream and replay in a graph."""
    from dist_runtime.comm.nccl import NcclCommunicator
    from dist_runtime.comm.solo import SoloCommunicator
    from dist_runtime.mapping import Mapping

    comm = NcclCommunicator(Mapping(), SoloCommunicator(Mapping()))
    x = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    expected = x.clone()
    assert torch.equal(comm.all_reduce(x), expected)
    static = torch.zeros(8, 4, device="cuda")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        gathered = comm.all_gather(comm.all_reduce(static) * 2)
    static.copy_(torch.arange(32.0, device="cuda").view(8, 4))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(gathered, static * 2)
    assert comm.broadcast_object({"step": 1}) == {"step": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,size", [(1, 4096), (3, 4104), (40, 2048)])
def test_one_shot_sum_fused_with_rmsnorm_norms_as_the_reference_at_world_size_1(dtype, rows, size):
    """One GPU: the kernel's norm, rounding and lanes (tests/test_multi_gpu.py sums over several).
    Eagerly against RMSNorm.reference; in a CUDA graph, between plain sums, as eagerly."""
    from dist_runtime.comm.one_shot import OneShotAllReduce
    from dist_runtime.comm.solo import SoloCommunicator
    from dist_runtime.layers.norm import RMSNorm
    from dist_runtime.mapping import Mapping

    one_shot = OneShotAllReduce(SoloCommunicator(Mapping()))
    assert one_shot.error is None
    norm = RMSNorm(size, 1e-5).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x, residual = (torch.randn(rows, size, device="cuda", dtype=dtype) for _ in range(2))
    assert one_shot.fits_norm(x, residual, norm.weight)
    out, summed = one_shot.add_rmsnorm(x, residual.clone(), norm.weight, norm.eps)
    ref, ref_summed = norm.reference(x, residual.clone())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.equal(summed, ref_summed) and torch.allclose(out, ref, rtol=tol, atol=tol)

    def calls(r: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for _ in range(2):
            one_shot(y)
            outs.append(one_shot.add_rmsnorm(x, r, norm.weight, norm.eps)[0])
        return outs

    eager_r, eager_y = residual.clone(), x.clone()
    eager = calls(eager_r, eager_y)
    r, y, graph = residual.clone(), x.clone(), torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        outs = calls(r, y)
    r.copy_(residual)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip([r, y, *outs], [eager_r, eager_y, *eager]))
    one_shot.close()


def test_sampling_noise_and_draws_are_the_same_on_gpu_and_cpu():
    from dist_runtime.sampler import uniform_noise

    seeds, index = torch.tensor([3, 2**62 - 1]), torch.tensor([0, 77])
    assert torch.equal(uniform_noise(seeds, index, 1000), uniform_noise(seeds.cuda(), index.cuda(), 1000).cpu())


@pytest.mark.parametrize("kv", ["auto", FP8_KV])
@pytest.mark.parametrize("interleaved,rotary_dim,dim", [(False, 64, 64), (True, 16, 64), (False, 96, 96)])
def test_fused_rotary_and_cache_write_match_the_cpu_path(interleaved, rotary_dim, dim, kv):
    """PagedAttention with its rotary on the GPU (one kernel rotates and caches) against the
    same module on the CPU (rotate, then index_put), for decodes, a fresh prompt and a chunk;
    with an fp8 cache, both quantize with the KV heads' own scales."""
    from dist_runtime.layers.rotary import RotaryEmbedding

    torch.manual_seed(1)
    heads, kv_heads, bs = 6, 3, 16
    seqs = [(1, 20), (1, 3), (12, 12), (5, 30)]  # (new tokens, context)
    starts, slots = [0], []
    tables = torch.arange(len(seqs) * 2).view(len(seqs), 2)
    for i, (new, ctx) in enumerate(seqs):
        starts.append(starts[-1] + new)
        slots += [tables[i, p // bs].item() * bs + p % bs for p in range(ctx - new, ctx)]
    positions = torch.tensor([p for new, ctx in seqs for p in range(ctx - new, ctx)])
    q, k, v = (torch.randn(starts[-1], h, dim) for h in (heads, kv_heads, kv_heads))
    cache = torch.randn(len(seqs) * 2, bs, kv_heads, dim)
    if kv == "fp8":
        cache = cache.to(FP8)
    results = []
    for device in ("cpu", "cuda"):
        rope = RotaryEmbedding(dim, rotary_dim, 10000.0, None, interleaved).to(device)
        attn = PagedAttention(heads, kv_heads, dim, dim**-0.5)
        attn.k_cache, attn.v_cache = cache.clone().to(device), cache.clone().to(device)
        if kv == "fp8":  # k and v reach up to about 300 of E4M3's 448
            attn.k_scale = torch.tensor([1 / 64, 1 / 80, 1 / 72], device=device)
            attn.v_scale = torch.tensor([1 / 32, 1 / 64, 1 / 48], device=device)
        meta = AttentionMetadata(torch.tensor(slots, device=device), starts, [c for _, c in seqs],
                                 tables.to(device),
                                 torch.tensor([c for _, c in seqs], device=device, dtype=torch.int32),
                                 num_decodes=2)
        out = attn(q.clone().to(device), k.clone().to(device), v.clone().to(device), meta, rope, positions.to(device))
        results.append((out.cpu(), attn.k_cache.cpu(), attn.v_cache.cpu()))
    (cpu_out, cpu_k, cpu_v), (gpu_out, gpu_k, gpu_v) = results
    if kv == "auto":
        assert torch.allclose(gpu_k, cpu_k, atol=1e-5) and torch.equal(gpu_v, cpu_v)
        assert torch.allclose(gpu_out, cpu_out, atol=1e-4)
        return
    # At most a step of E4M3 apart (a rounding the two sides may take differently): 1/8 of a
    # normal value, 2^-9 below the normal range
    for gpu, cpu in ((gpu_k, cpu_k), (gpu_v, cpu_v)):
        assert ((gpu.float() - cpu.float()).abs() <= cpu.float().abs() / 8 + 2.0**-9).all()
    # The GPU's fresh prompt attends over its own unrounded keys, the CPU's over the cache
    assert rel_err(gpu_out, cpu_out) < 5e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 8, 2, 128), (7, 5, 5, 96), (33, 4, 2, 16),
                                                            (5, 64, 8, 128)])
def test_q_and_k_norms_per_head_match_the_reference_in_place(dtype, tokens, heads, kv_heads, head_dim):
    """Qwen3's q_norm and k_norm: one kernel over each head of q and k, in place in the strided
    views split_qkv gives (v, beside them, untouched)."""
    from dist_runtime.layers.norm import RMSNorm, norm_heads

    torch.manual_seed(0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype) * 3
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    norms = [RMSNorm(head_dim, 1e-6).cuda().to(dtype) for _ in range(2)]
    for norm in norms:
        torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    expected, v_before = (norms[0].reference(q), norms[1].reference(k)), v.clone()
    got = norm_heads(q, k, *norms)
    assert got[0].data_ptr() == q.data_ptr() and got[1].data_ptr() == k.data_ptr() and torch.equal(v, v_before)
    for out, ref in zip(got, expected):
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out.float(), ref.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3"])
def test_gpu_float32_engines_of_qwen2_qwen3_and_phi3_give_the_cpu_tokens(family, engines):
    """q, k and v biases, q/k norms before the fused rotary and cache write, slices of fused
    checkpoint tensors, partial rotary and per-layer windows on the GPU path."""
    assert_gpu_gives_cpu_tokens(str(engines(family, 1, 1, max_seq_len=256, max_num_tokens=32)), PROMPTS)


@pytest.mark.parametrize("dtype", ["bf16", pytest.param("fp8", marks=pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 GEMMs need compute capability 8.9+"))])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3"])
def test_gpu_bf16_and_fp8_engines_of_qwen2_qwen3_and_phi3_follow_the_cpu_float32_reference(family, dtype, engines):
    """Against the float32 engine on the CPU: the first logits within 3% (bf16; the CPU's own
    bf16 engine is 1 to 1.5% off) or 10% (fp8: weights and activations in E4M3, q, k and v's
    biases added by _scaled_mm), and the greedy tokens equal up to a near tie, where each side's
    token is among the other's top 5."""
    assert_gpu_follows_cpu_reference(str(engines(family, 1, 1, "fp32", max_seq_len=256)),
                                     str(engines(family, 1, 1, dtype, max_seq_len=256)), PROMPTS,
                                     3e-2 if dtype == "bf16" else 0.1)


@pytest.mark.parametrize("kv", ["auto", FP8_KV])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,window", [(8, 2, None), (8, 2, 7), (4, 4, None)])
def test_paged_attention_kernels_soft_cap_their_scores_as_the_reference(heads, kv_heads, window, dtype, kv):
    """Gemma 2's soft cap (tanh(s / cap) * cap before the mask) in both kernels, beside a window,
    over an fp8 cache, in the decode launches the tuner may pick; scores of about 4 times the
    cap, so that the cap changes them much."""
    from dist_runtime.kernels.paged_decode import fp8_products_fit, paged_decode_attention
    from dist_runtime.kernels.paged_prefill import (
        fp8_scores_fit,
        launch_for,
        paged_prefill_attention,
        prefill_tiles,
        round_q_e4m3,
    )

    torch.manual_seed(0)
    head_dim, block_size, cap = 64, 16, 2.0
    seqs = [(1, 9), (1, 300), (300, 300), (5, 5), (64, 200), (17, 17)]
    max_blocks = -(-max(ctx for _, ctx in seqs) // block_size)
    num_blocks = len(seqs) * max_blocks + 3
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim**-0.5, window, softcap=cap)
    attn.k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype) * 3
    attn.v_cache = torch.randn_like(attn.k_cache)
    tables = torch.randperm(num_blocks, device="cuda")[: len(seqs) * max_blocks].view(len(seqs), max_blocks)
    starts = [0]
    for new, _ in seqs:
        starts.append(starts[-1] + new)
    context = [ctx for _, ctx in seqs]
    q = torch.randn(starts[-1], heads, head_dim, device="cuda", dtype=dtype) * 3
    if kv == "fp8":
        quantize_cache(attn)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # decode: each sequence's last query over its whole context
    last = torch.tensor(starts[1:], device="cuda") - 1
    meta = AttentionMetadata(torch.empty(0), list(range(len(seqs) + 1)), context, tables)
    ref = attn.reference(q[last].double() if dtype == torch.float32 else q[last], meta)
    launches = [{}, {"splits": 3, "block_n": 32, "num_warps": 8}]
    if heads == kv_heads:
        launches.append({"vector": True, "block_n": 16})
    if fp8_products_fit(dtype, heads // kv_heads, head_dim, kv == "fp8"):
        launches.append({"fp8_products": True, "num_stages": 1})
    lens = torch.tensor(context, device="cuda", dtype=torch.int32)
    for launch in launches:
        out = paged_decode_attention(q[last], attn.k_cache, attn.v_cache, tables, lens, attn.scale, window,
                                     k_scale=attn.k_scale, v_scale=attn.v_scale, softcap=cap, **launch)
        limit = 5e-2 if launch.get("fp8_products") else tol
        assert rel_err(out, ref) < limit, launch
    # prefill: every sequence but the two decodes in front
    meta = AttentionMetadata(torch.empty(0), starts, context, tables)
    launch = launch_for(head_dim, kv == "fp8", dtype)
    tiles = torch.from_numpy(prefill_tiles(starts, context, 2, launch[0])).cuda()
    out = torch.full_like(q, 7.0)
    paged_prefill_attention(q, attn.k_cache, attn.v_cache, tables, tiles,
                            torch.tensor(starts, device="cuda", dtype=torch.int32), lens, attn.scale, window, out,
                            attn.k_scale, attn.v_scale, launch, softcap=cap)
    if kv == "fp8" and dtype != torch.float32 and fp8_scores_fit(head_dim):
        q = round_q_e4m3(q).to(dtype)  # the fp8 scores take q rounded so
    ref = attn.reference(q.double() if dtype == torch.float32 else q, meta)
    assert (out[:2] == 7.0).all() and rel_err(out[2:], ref[2:]) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,size", [(1, 64), (7, 3584), (33, 5000)])
def test_fused_gemma_rmsnorm_matches_the_reference(dtype, tokens, size):
    """x * (1 + w) in float32, rounded once; with a residual, the sum as the reference rounds it;
    and over each head of q, a strided view (Gemma 3's q_norm)."""
    from dist_runtime.layers.norm import GemmaRMSNorm

    torch.manual_seed(0)
    norm = GemmaRMSNorm(size, 1e-6).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 0.0, 0.5)
    x, residual = (torch.randn(tokens, size, device="cuda", dtype=dtype) * 3 for _ in range(2))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(norm(x).float(), norm.reference(x).float(), rtol=tol, atol=tol)
    fused, summed = norm(x, residual.clone())
    ref, ref_summed = norm.reference(x, residual.clone())
    assert torch.equal(summed, ref_summed) and torch.allclose(fused.float(), ref.float(), rtol=tol, atol=tol)
    head_norm = GemmaRMSNorm(32, 1e-6).cuda().to(dtype)
    torch.nn.init.normal_(head_norm.weight, 0.0, 0.5)
    heads = x[:, : size // 64 * 32].view(tokens, size // 64, 32)  # half of each row as heads: a strided view
    assert torch.allclose(head_norm(heads).float(), head_norm.reference(heads).float(), rtol=tol, atol=tol)


# a prompt longer than the windows (8) and than the step's token budget (32): chunked prefill
# over windowed and global layers
GEMMA_PROMPTS = [*PROMPTS, " ".join(f"word{i}" for i in range(40))]  # 144 tokens


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gpu_float32_engines_of_gemma2_and_gemma3_give_the_cpu_tokens(family, engines):
    """Per-layer windows and rotary bases through the fused rotary kernel, q/k norms before it,
    soft caps in both attention kernels and on the logits, the decode CUDA graphs, chunked
    prefill: the CPU's tokens (which are transformers')."""
    assert_gpu_gives_cpu_tokens(str(engines(family, 1, 1, max_seq_len=256, max_num_tokens=32)), GEMMA_PROMPTS)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gpu_bf16_engines_of_gemma2_and_gemma3_follow_the_cpu_float32_reference(family, engines):
    """Against the float32 engine on the CPU: the first logits within 5% (the CPU's own bf16
    engine is 1 to 3.5% off: with a norm after each block, a block's rounding joins the residual
    stream at full size), and the greedy tokens equal up to a near tie, where each side's token
    is among the other's top 5."""
    assert_gpu_follows_cpu_reference(str(engines(family, 1, 1, "fp32", max_seq_len=256)),
                                     str(engines(family, 1, 1, "bf16", max_seq_len=256)), GEMMA_PROMPTS, 5e-2)
