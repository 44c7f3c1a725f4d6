"""The Triton kernels on the CPU: how the prefill kernel (kernels/paged_prefill.py) splits a
step's prompts into tiles, and the kernels against their torch references through Triton's
interpreter, which runs their code with numpy: prefill and decode attention, and the fused
RMSNorm, LayerNorm, rotary and SiLU-and-mul (kernels/fused.py). On a GPU, tests/test_gpu.py
runs them compiled. Float32 only (the interpreter's bfloat16 is not the GPU's), and not the
launches that use inline PTX (fp8 quantizing, float16 conversion on load), which it cannot
run. Run as a script, this file does the interpreted checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_runtime.kernels.paged_prefill import prefill_tiles


def test_prefill_tiles_cover_each_prompt_once_longest_first():
    # (new tokens, context): two decodes (left to the decode kernel), a fresh prompt of 300,
    # a chunk of 64 after 136 cached tokens, a one-token chunk, a fresh 5
    seqs = [(1, 9), (1, 2), (300, 300), (64, 200), (1, 11), (5, 5)]
    starts = [0]
    for new, _ in seqs:
        starts.append(starts[-1] + new)
    context = [ctx for _, ctx in seqs]
    tiles = prefill_tiles(starts, context, 2, 128)
    assert tiles.dtype.name == "int32" and tiles.shape[1] == 2
    covered = sorted((int(seq), int(start)) for seq, start in tiles)
    assert covered == [(2, 0), (2, 128), (2, 256), (3, 0), (4, 0), (5, 0)]
    keys = [context[seq] - seqs[seq][0] + min(start + 128, seqs[seq][0]) for seq, start in tiles]
    assert keys == sorted(keys, reverse=True)  # the last tile of the 300 (all its keys) first
    assert tuple(tiles[0]) == (2, 256) and keys[-1] == 5
    assert len(prefill_tiles(starts, context, len(seqs), 128)) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, tests/test_gpu.py runs the compiled kernels")
def test_kernels_match_their_references_in_tritons_interpreter():
    """Prefill: decodes in front (their rows left alone), fresh prompts, chunks after cached
    keys, with and without a sliding window, an fp8 cache, tiles smaller than a prompt. Decode:
    one split and several, the vector kernel, windows, fp8. Both with soft-capped scores too
    (Gemma 2), alone and beside a window. Heads of 24 wide, not a power of two, in both and in
    the rotary kernel's cache write. The fused kernels at awkward sizes, q and k norms in place."""
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 31
    for case, err in results.items():
        assert err < 1e-5, (case, err)


def _attention(heads: int, kv_heads: int, dim: int, block_size: int, blocks: int, window: int | None, fp8: bool,
               softcap: float | None = None):
    """A layer over a random cache (divided by per-KV-head scales into E4M3 with `fp8`). Its
    scores have about unit spread, so a soft cap of 1 or 2 changes them much."""
    from conftest import quantize_cache

    from dist_runtime.layers.attention import PagedAttention

    torch.manual_seed(0)
    attn = PagedAttention(heads, kv_heads, dim, dim**-0.5, window, softcap)
    attn.k_cache = torch.randn(blocks, block_size, kv_heads, dim)
    attn.v_cache = torch.randn_like(attn.k_cache) * 2
    if fp8:
        quantize_cache(attn)
    return attn


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _prefill_checks() -> dict[str, float]:
    """Relative errors against the reference; infinite where the decodes' rows were written."""
    from dist_runtime.kernels.paged_prefill import paged_prefill_attention
    from dist_runtime.layers.attention import AttentionMetadata

    # (new tokens, context): two decodes, fresh prompts of 70 and 3, chunks of 40 after 30 and
    # of 5 after 7 cached tokens, a one-token chunk
    seqs = [(1, 9), (1, 2), (70, 70), (3, 3), (40, 70), (5, 12), (1, 11)]
    starts = [0]
    for new, _ in seqs:
        starts.append(starts[-1] + new)
    context = [ctx for _, ctx in seqs]
    results = {}
    cases = [(4, None, False, None, None), (16, None, False, (16, 16, 1, 1), None), (8, 5, False, None, None),
             (16, 37, False, (16, 16, 1, 1), None), (4, None, True, None, None), (16, 20, True, (32, 16, 1, 1), None),
             (16, None, True, (16, 32, 1, 1), None), (32, None, False, (16, 16, 1, 1), None),
             (16, None, False, (16, 16, 1, 1), 1.5), (8, 5, False, None, 2.0), (4, None, True, None, 1.0)]
    # heads of 16, and of 24: not a power of two (Phi-3-mini's are 96), read into padded tiles
    for block_size, window, fp8, launch, softcap, dim in [(*case, 16) for case in cases] + [
            (16, 5, False, (16, 16, 1, 1), None, 24), (4, None, True, None, None, 24)]:
        blocks = -(-max(context) // block_size)
        attn = _attention(4, 2, dim, block_size, len(seqs) * blocks, window, fp8, softcap)
        tables = torch.randperm(len(seqs) * blocks).view(len(seqs), blocks)
        meta = AttentionMetadata(torch.empty(0), starts, context, tables, torch.tensor(context), num_decodes=2)
        q = torch.randn(starts[-1], 4, dim)
        out = torch.full_like(q, 7.0)
        if launch is None:  # the engine's way in, with its launch for float32
            attn._prefill(q, out, meta, first=2)
        else:
            tiles = torch.from_numpy(prefill_tiles(starts, context, 2, launch[0]))
            paged_prefill_attention(q, attn.k_cache, attn.v_cache, tables, tiles,
                                    torch.tensor(starts, dtype=torch.int32), meta.context_lens_tensor, attn.scale,
                                    window, out, attn.k_scale, attn.v_scale, launch, softcap or 0.0)
        err = _rel_err(out[2:], attn.reference(q.double(), meta)[2:]) if (out[:2] == 7).all() else float("inf")
        results[f"prefill block_size={block_size} window={window} fp8={fp8} launch={launch} softcap={softcap} "
                f"head_dim={dim}"] = err
    return results


def _decode_checks() -> dict[str, float]:
    from dist_runtime.kernels.paged_decode import paged_decode_attention
    from dist_runtime.layers.attention import AttentionMetadata

    context = [1, 2, 3, 4, 5, 40, 77]
    results = {}
    cases = [(8, 2, None, False, {}, None), (8, 2, 5, False, {"splits": 3, "block_n": 16}, None),
             (4, 4, None, True, {"vector": True, "block_n": 16}, None),
             (8, 2, 30, True, {"splits": 2, "num_warps": 8}, None), (8, 2, None, False, {}, 1.5),
             (8, 2, 5, False, {"splits": 3, "block_n": 16}, 2.0),
             (4, 4, None, True, {"vector": True, "block_n": 16}, 1.0)]
    for heads, kv_heads, window, fp8, launch, softcap, dim in [(*case, 16) for case in cases] + [
            (8, 2, None, False, {"splits": 2, "block_n": 16}, None, 24),
            (4, 4, None, True, {"vector": True, "block_n": 16}, None, 24)]:
        blocks = -(-max(context) // 4)
        attn = _attention(heads, kv_heads, dim, 4, len(context) * blocks, window, fp8, softcap)
        tables = torch.randperm(len(context) * blocks).view(len(context), blocks)
        q = torch.randn(len(context), heads, dim)
        out = paged_decode_attention(q, attn.k_cache, attn.v_cache, tables, torch.tensor(context), attn.scale, window,
                                     k_scale=attn.k_scale, v_scale=attn.v_scale, softcap=softcap or 0.0, **launch)
        meta = AttentionMetadata(torch.empty(0), list(range(len(context) + 1)), context, tables)
        results[f"decode {heads}/{kv_heads} window={window} fp8={fp8} {launch} softcap={softcap} head_dim={dim}"] = (
            _rel_err(out, attn.reference(q.double(), meta)))
    return results


def _fused_checks() -> dict[str, float]:
    """Largest absolute differences from the references (infinite where a residual sum differs)."""
    from dist_runtime.kernels.fused import add_rmsnorm, layernorm, qk_norm_, rotary_, silu_and_mul
    from dist_runtime.layers.norm import GemmaRMSNorm, LayerNorm, RMSNorm
    from dist_runtime.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    results = {}
    norm = RMSNorm(5000, 1e-5)  # wider than a power of two: a masked tail
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x, residual = torch.randn(3, 5000), torch.randn(3, 5000)
    summed = residual.clone()
    out = add_rmsnorm(x, norm.weight, 1e-5, summed)
    ref, ref_summed = norm.reference(x, residual.clone())
    results["add_rmsnorm"] = (out - ref).abs().max().item() if torch.equal(summed, ref_summed) else float("inf")
    results["rmsnorm"] = (add_rmsnorm(x, norm.weight, 1e-5) - norm.reference(x)).abs().max().item()
    gemma = GemmaRMSNorm(5000, 1e-6)  # weights stored as their offset from 1
    torch.nn.init.normal_(gemma.weight, 0.0, 0.1)
    summed = residual.clone()
    out = add_rmsnorm(x, gemma.weight, 1e-6, summed, plus_one=True)
    ref, ref_summed = gemma.reference(x, residual.clone())
    results["gemma add_rmsnorm"] = (out - ref).abs().max().item() if torch.equal(summed, ref_summed) else float("inf")
    ln = LayerNorm(300, 1e-5)
    torch.nn.init.normal_(ln.weight, 1.0, 0.1)
    torch.nn.init.normal_(ln.bias, 0.0, 0.1)
    x = torch.randn(3, 300) * 3 + 1  # an offset that the mean removes
    results["layernorm"] = (layernorm(x, ln.weight, ln.bias, 1e-5) - ln.reference(x)).abs().max().item()
    for head_dim, rotary_dim, interleaved in [(16, 16, False), (16, 8, True)]:
        rope = RotaryEmbedding(head_dim, rotary_dim, 500000.0, None, interleaved)
        positions = torch.randint(0, 8000, (5,))
        q, k = torch.randn(5, 5, head_dim), torch.randn(5, 3, head_dim)  # 5 and 3 heads: padded inside
        ref_q, ref_k = rope.reference(positions, q.clone(), k.clone())
        got_q, got_k = rotary_(q.clone(), k.clone(), positions, rope.inv_freq, interleaved)
        results[f"rotary {head_dim}/{rotary_dim} interleaved={interleaved}"] = max(
            (got_q - ref_q).abs().max().item(), (got_k - ref_k).abs().max().item())
    # heads of 24 (padded to 32 inside), longrope's scaled cos and sin, k and v written to their
    # cache slots [slots, kv_heads, head_dim]
    longrope = {"rope_type": "longrope", "short_factor": [1.0 + i / 4 for i in range(12)], "attention_factor": 1.2}
    rope = RotaryEmbedding(24, 24, 10000.0, longrope, False)
    q, k, v = torch.randn(5, 4, 24), torch.randn(5, 2, 24), torch.randn(5, 2, 24)
    k_cache, v_cache, slots = torch.zeros(8, 2, 24), torch.zeros(8, 2, 24), torch.tensor([6, 0, 3, 7, 1])
    ref_q, ref_k = rope.reference(positions, q.clone(), k.clone())
    got_q, _ = rotary_(q.clone(), k.clone(), positions, rope.inv_freq, False, v, k_cache, v_cache, slots,
                       attention_factor=rope.attention_factor)
    results["rotary (longrope) and cache write, heads of 24"] = max(
        (got_q - ref_q).abs().max().item(), (k_cache[slots] - ref_k).abs().max().item(),
        (v_cache[slots] - v).abs().max().item(), k_cache[[2, 4, 5]].abs().max().item())
    # Qwen3's q and k norms: heads of 24 (padded inside), 5 and 3 of them, views into one qkv row
    qkv = torch.randn(4, (5 + 2 * 3) * 24) * 3
    q, k = qkv[:, :120].view(4, 5, 24), qkv[:, 120:192].view(4, 3, 24)
    q_norm, k_norm = RMSNorm(24, 1e-6), RMSNorm(24, 1e-6)
    for norm in (q_norm, k_norm):
        torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    ref_q, ref_k, v = q_norm.reference(q), k_norm.reference(k), qkv[:, 192:].clone()
    qk_norm_(q, k, q_norm.weight, k_norm.weight, 1e-6, 1e-6)
    results["q and k norms per head, in place"] = max((q - ref_q).abs().max().item(), (k - ref_k).abs().max().item(),
                                                      (qkv[:, 192:] - v).abs().max().item())
    gate_up = torch.randn(3, 2 * 1100)  # past one block of 1,024
    gate, up = gate_up.chunk(2, dim=-1)
    results["silu_and_mul"] = (silu_and_mul(gate_up) - torch.nn.functional.silu(gate) * up).abs().max().item()
    return results


if __name__ == "__main__":
    print(json.dumps({**_prefill_checks(), **_decode_checks(), **_fused_checks()}))
