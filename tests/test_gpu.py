"""The GPU path against the CPU reference: the paged decode kernel over awkward shapes, and
whole engines (float32: the same tokens; bfloat16: the same first tokens). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from dist_runtime import LLM, SamplingParams
from dist_runtime.layers.attention import AttentionMetadata, PagedAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window", [
    (4, 4, 16, 16, None), (8, 2, 64, 16, None), (32, 8, 128, 16, None), (8, 1, 128, 8, None),
    (16, 16, 256, 32, None), (8, 2, 64, 16, 7)])
def test_paged_decode_kernel_matches_the_reference(dtype, heads, kv_heads, head_dim, block_size, window):
    from dist_runtime.kernels.paged_decode import paged_decode_attention

    torch.manual_seed(0)
    context = [1, 2, block_size - 1, block_size, block_size + 1, 100, 257]
    max_blocks = -(-max(context) // block_size)
    num_blocks = len(context) * max_blocks + 3
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim**-0.5, window)
    attn.k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    attn.v_cache = torch.randn_like(attn.k_cache)
    tables = torch.randperm(num_blocks, device="cuda")[: len(context) * max_blocks].view(len(context), max_blocks)
    tables = tables.to(torch.int32)
    q = torch.randn(len(context), heads, head_dim, device="cuda", dtype=dtype)
    ctx = torch.tensor(context, device="cuda", dtype=torch.int32)
    out = paged_decode_attention(q, attn.k_cache, attn.v_cache, tables, ctx, attn.scale, window)
    meta = AttentionMetadata(torch.empty(0), list(range(len(context) + 1)), context, tables.long())
    ref = attn.reference(q.double(), meta) if dtype == torch.float32 else attn.reference(q, meta)
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
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


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_gpu_bfloat16_engine_gives_the_first_cpu_tokens(arch, engines):
    """Against the CPU running the same bf16 engine (the same rounded weights)."""
    engine = str(engines(arch, 1, 1, dtype="bf16"))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with LLM(engine) as cpu:
        expected = cpu.generate(PROMPTS, params, return_logits=True)
    with LLM(engine, device="cuda") as gpu:
        got = gpu.generate(PROMPTS, params, return_logits=True)
    for ours, ref in zip(got, expected):
        a, b = ours.outputs[0].logits[0].cpu(), ref.outputs[0].logits[0]
        assert ((a - b).norm() / b.norm()).item() < 2e-2
        assert ours.token_ids == ref.token_ids, ((a - b).abs().max(), b.topk(2))
