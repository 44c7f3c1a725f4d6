"""The fused MoE kernels (kernels/fused_moe.py) against their torch references (layers/moe.py):
the sorting of (token, expert) pairs in plain torch; routing and the grouped GEMMs through
Triton's interpreter on the CPU (float32 activations, with float32, fp8 and int8 weights);
compiled on a GPU at the public models' shapes in bf16, fp8 and int8, inside a CUDA graph, and
whole MoE engines against the CPU (the GPU tests skip without CUDA). Run as a script, this file
does the interpreted checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, SMALL_PLAN, assert_gpu_follows_cpu_reference, assert_gpu_gives_cpu_tokens

from dist_runtime.kernels.fused_moe import fused_experts, sort_by_expert, topk_softmax
from dist_runtime.layers.moe import experts_reference, route
from dist_runtime.presets import preset_config
from dist_runtime.quantization import dequantize_weight, quantize_rows_fp8, quantize_weight
from sharding.builder import build_engine
from sharding.synth import write_checkpoint

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="fp8 needs compute capability 8.9+")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _case(tokens: int, hidden: int, inter: int, experts: int, top_k: int, device: str = "cpu",
          dtype: torch.dtype = torch.float32, seed: int = 0):
    """x, every expert's stacked weights, and routing of random logits."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen, device=device) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen, device=device) / inter**0.5).to(dtype)
    weights, ids = route(torch.randn(tokens, experts, generator=gen, device=device), top_k, True)
    return x, gate_up, down, weights, ids


def w8a8_reference(x, gate_up, down, weights, ids, first, gate_up_scale, down_scale) -> torch.Tensor:
    """experts_reference with fp8 weights as fused_experts takes them: every GEMM input
    quantized per token, emulated in float32 (fp8 GEMMs need a GPU)."""

    def gemm(a, weight, scale):
        values, a_scale = quantize_rows_fp8(a)
        return ((values.float() * a_scale) @ dequantize_weight(weight, scale).t()).to(a.dtype)

    out = torch.zeros_like(x)
    for e in range(len(gate_up)):
        token, slot = torch.where(ids - first == e)
        if len(token):
            gate, up = gemm(x[token], gate_up[e], gate_up_scale[e]).chunk(2, dim=-1)
            y = gemm(F.silu(gate.float()).to(x.dtype) * up, down[e], down_scale[e])
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


def test_pairs_are_laid_out_by_expert_in_padded_blocks_and_other_ranks_experts_left_out():
    ids = torch.tensor([[5, 2], [2, 7], [3, 2], [6, 5]])  # tokens x top 2; this rank holds experts 2-5
    pairs, block_expert = sort_by_expert(ids, 2, 4, 4)
    blocks = [(int(e), pairs[4 * b: 4 * b + 4].tolist()) for b, e in enumerate(block_expert)]
    # pair p is token p // 2's choice p % 2; padding and unused blocks hold 8 (no pair)
    assert blocks[:3] == [(0, [1, 2, 5, 8]), (1, [4, 8, 8, 8]), (3, [0, 7, 8, 8])]
    assert all(e == -1 and p == [8] * 4 for e, p in blocks[3:])
    assert len(block_expert) == 2 + 4  # at most ceil(pairs / block) + min(pairs, experts) blocks
    one = sort_by_expert(torch.tensor([[9]]), 0, 128, 16)  # a decode step of one token
    assert one[1].tolist() == [9, -1] and one[0][:2].tolist() == [0, 1]


def test_fused_experts_refuses_weights_whose_rows_are_not_contiguous():
    x, gate_up, down, weights, ids = _case(2, 64, 32, 4, 2)
    columns_first = gate_up.transpose(1, 2).contiguous().transpose(1, 2)  # same values, rows strided
    with pytest.raises(ValueError, match="each weight row contiguous"):
        fused_experts(x, columns_first, down, weights, ids, 0)
    (qg, sg), (qd, sd) = quantize_weight(gate_up, "int8wo"), quantize_weight(down, "int8wo")
    with pytest.raises(ValueError, match="scales as contiguous"):
        fused_experts(x, qg, qd, weights, ids, 0, sg.t().contiguous().t(), sd)


def _interpreted_checks() -> dict[str, float]:
    """Relative errors of the kernels against their references, float32 activations."""
    errors = {}
    for experts, top_k, tokens, renormalize in ((8, 2, 5, True), (60, 4, 1, False), (128, 8, 3, True)):
        logits = torch.randn(tokens, experts)
        (w, i), (rw, ri) = topk_softmax(logits, top_k, renormalize), route(logits, top_k, renormalize)
        errors[f"route {experts}/{top_k}"] = rel_err(w, rw) + float(not torch.equal(i, ri))
    # one token; odd sizes past a block; this rank holding experts 4-7 of 8; blocks of 64 rows
    for tokens, hidden, inter, experts, top_k, first, local, launch in (
            (1, 64, 48, 8, 2, 0, 8, None), (7, 96, 40, 8, 3, 4, 4, None), (33, 64, 32, 16, 4, 0, 16, (64, 32, 64, 4))):
        x, gate_up, down, weights, ids = _case(tokens, hidden, inter, experts, top_k)
        gate_up, down = gate_up[first:first + local], down[first:first + local]
        name = f"{tokens}x{hidden} {local} of {experts} experts"
        out = fused_experts(x, gate_up, down, weights, ids, first, launch=launch)
        errors[name] = rel_err(out, experts_reference(x, gate_up, down, weights, ids, first))
        for fmt in ("int8wo", "fp8"):
            (qg, sg), (qd, sd) = quantize_weight(gate_up, fmt), quantize_weight(down, fmt)
            out = fused_experts(x, qg, qd, weights, ids, first, sg, sd, launch=launch)
            ref = (w8a8_reference if fmt == "fp8" else experts_reference)(x, qg, qd, weights, ids, first, sg, sd)
            errors[f"{name} {fmt}"] = rel_err(out, ref)
    return errors


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, the tests below run the compiled kernels")
def test_moe_kernels_match_their_references_in_tritons_interpreter():
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(errors) == 12
    for case, err in errors.items():
        assert err < 1e-5, (case, err)


@GPU
@pytest.mark.parametrize("experts,top_k", [(8, 2), (60, 4), (128, 8)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_routing_kernel_chooses_as_the_reference(experts, top_k, tokens):
    logits = torch.randn(tokens, experts, device="cuda", dtype=torch.bfloat16)
    for renormalize in (True, False):
        (w, i), (rw, ri) = topk_softmax(logits, top_k, renormalize), route(logits, top_k, renormalize)
        assert torch.equal(i, ri) and rel_err(w, rw) < 1e-6


# Qwen3-30B-A3B's experts (all on one GPU, and an eighth under ep=8), Mixtral-8x7B's under tp=8
SHAPES = [(2048, 768, 128, 8, 0, 128), (2048, 768, 128, 8, 48, 16), (4096, 1792, 8, 2, 0, 8)]


@GPU
@pytest.mark.parametrize("hidden,inter,experts,top_k,first,local", SHAPES)
@pytest.mark.parametrize("tokens", [1, 7, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_experts_match_the_reference_on_gpu(dtype, tokens, hidden, inter, experts, top_k, first, local):
    x, gate_up, down, weights, ids = _case(tokens, hidden, inter, experts, top_k, "cuda", dtype)
    gate_up, down = gate_up[first:first + local].contiguous(), down[first:first + local].contiguous()
    out = fused_experts(x, gate_up, down, weights, ids, first)
    assert rel_err(out, experts_reference(x, gate_up, down, weights, ids, first)) < (
        1e-5 if dtype == torch.float32 else 1e-2)


@GPU
@pytest.mark.parametrize("hidden,inter,experts,top_k,first,local", SHAPES)
@pytest.mark.parametrize("tokens", [1, 7, 256])
@pytest.mark.parametrize("fmt", [pytest.param("fp8", marks=FP8_GPU), "int8wo"])
def test_quantized_fused_experts_match_the_reference_on_gpu(fmt, tokens, hidden, inter, experts, top_k, first,
                                                            local):
    x, gate_up, down, weights, ids = _case(tokens, hidden, inter, experts, top_k, "cuda", torch.bfloat16)
    (qg, sg), (qd, sd) = (quantize_weight(w[first:first + local], fmt) for w in (gate_up, down))
    out = fused_experts(x, qg, qd, weights, ids, first, sg, sd)
    ref = (w8a8_reference if fmt == "fp8" else experts_reference)(x, qg, qd, weights, ids, first, sg, sd)
    assert rel_err(out, ref) < 2e-2


@GPU
def test_routing_and_experts_replay_from_a_cuda_graph():
    """A decode step's graph holds the routing, the sorting and both GEMMs: no host sync."""
    x, gate_up, down, _, _ = _case(4, 2048, 768, 128, 8, "cuda", torch.bfloat16)
    router = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16) / 2048**0.5
    static = x.clone()

    def step():
        weights, ids = topk_softmax(static @ router.t(), 8, True)
        return fused_experts(static, gate_up, down, weights, ids, 0)

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    static.copy_(torch.randn_like(static))
    graph.replay()
    assert torch.equal(out, step())


@pytest.fixture(scope="module")
def moe_engines(tmp_path_factory):
    """moe_engines(arch, dtype) -> a tiny MoE engine's folder, TP 1."""
    root = tmp_path_factory.mktemp("moe-gpu")
    built = {}

    def get(arch: str, dtype: str) -> str:
        if (arch, dtype) not in built:
            checkpoint = root / arch
            if not checkpoint.exists():
                write_checkpoint(preset_config("tiny", arch), checkpoint, progress=False)
            built[arch, dtype] = root / f"{arch}-{dtype}"
            build_engine(checkpoint, built[arch, dtype], 1, 1, dtype, progress=False, **(SMALL_PLAN | {
                "max_seq_len": 256}))
        return str(built[arch, dtype])

    return get


@GPU
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_gpu_float32_moe_engine_gives_the_cpu_tokens(arch, moe_engines):
    assert_gpu_gives_cpu_tokens(moe_engines(arch, "fp32"), PROMPTS)


@GPU
@pytest.mark.parametrize("dtype", ["bf16", "int8wo", pytest.param("fp8", marks=FP8_GPU)])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_gpu_bf16_int8_and_fp8_moe_engines_follow_the_cpu_float32_reference(arch, dtype, moe_engines):
    """The first logits within 3% (bf16, int8) or 10% (fp8) of the float32 CPU engine's, and the
    greedy tokens equal up to a near tie, where each side's token is among the other's top 5."""
    assert_gpu_follows_cpu_reference(moe_engines(arch, "fp32"), moe_engines(arch, dtype), PROMPTS,
                                     0.1 if dtype == "fp8" else 3e-2)


if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps(_interpreted_checks()))
