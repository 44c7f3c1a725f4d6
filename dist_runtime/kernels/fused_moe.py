"""A mixture of experts on the GPU in Triton: routing (softmax over the experts, top k,
renormalised), then two grouped GEMMs over the (token, expert) pairs sorted by expert:
gate and up with SiLU-and-mul fused, then down, each pair's row scaled by its routing weight.
Weights are bf16 / fp16 / float32; fp8 (E4M3, a float32 scale per expert and output row, as
the dense fp8 GEMMs have) with the activations quantized per token (W8A8); or int8 with the
same scales, converted to the activations' dtype as loaded (weight-only, exact: |w| <= 127).

References (the CPU path, and what tests/test_kernels.py and tests/test_gpu.py compare against):
layers.moe.route for topk_softmax, layers.moe.experts_reference for fused_experts.

Sorting: the pairs of each expert this rank holds are laid out in runs padded to a multiple of
BLOCK_M, and each BLOCK_M block of the layout names its expert (or -1: nothing to do). All of
it is computed on the device with sizes fixed by the step's shape, so a decode step's CUDA
graph can hold it: at most ceil(pairs / BLOCK_M) + min(pairs, experts) blocks are ever used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dist_runtime.kernels.fused import fp8_rows
from dist_runtime.quantization import FP8, quantize_rows_fp8


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, n_experts, stride, TOP_K: tl.constexpr,
                         K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    row = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + row * stride + e, mask=e < n_experts, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    k = tl.arange(0, K_PAD)
    chosen = tl.zeros([K_PAD], dtype=tl.float32)
    chosen_ids = tl.zeros([K_PAD], dtype=tl.int64)
    for i in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        best_id = tl.min(tl.where(p == best, e, BLOCK_E), axis=0)  # the lowest id among equals
        chosen = tl.where(k == i, best, chosen)
        chosen_ids = tl.where(k == i, best_id.to(tl.int64), chosen_ids)
        p = tl.where(e == best_id, -1.0, p)
    if RENORMALIZE:
        chosen = chosen / tl.sum(chosen, axis=0)
    tl.store(weights_ptr + row * TOP_K + k, chosen, mask=k < TOP_K)
    tl.store(ids_ptr + row * TOP_K + k, chosen_ids, mask=k < TOP_K)


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.moe.route in one kernel: (weights float32 [tokens, top_k], ids int64 [tokens, top_k])."""
    logits = logits.contiguous()
    tokens, experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        _topk_softmax_kernel[(tokens,)](logits, weights, ids, experts, logits.stride(0), TOP_K=top_k,
                                        K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
                                        BLOCK_E=triton.next_power_of_2(experts))
    return weights, ids


def sort_by_expert(ids: torch.Tensor, first_expert: int, num_local: int,
                   block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs int32 [blocks * block_m], block_expert int32 [blocks]): pair p is token
    p // top_k's choice p % top_k; the pairs of local expert e (global first_expert + e) sit
    together, their run padded to whole blocks with the id `pairs` (nothing); the pairs of
    experts held elsewhere are left out. Device-side, without a host sync."""
    pairs, device = ids.numel(), ids.device
    local = ids.flatten() - first_expert
    local = torch.where((local >= 0) & (local < num_local), local, num_local)  # num_local: held elsewhere
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, local, torch.ones_like(local))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_local] = 0
    ends = padded.cumsum(0)
    order = torch.argsort(local, stable=True)
    grouped = local[order]
    rank_in_expert = torch.arange(pairs, device=device) - (counts.cumsum(0) - counts)[grouped]
    blocks = -(-pairs // block_m) + min(pairs, num_local)
    size = blocks * block_m
    position = torch.where(grouped < num_local, ends[grouped] - padded[grouped] + rank_in_expert, size)
    sorted_pairs = torch.full((size + 1,), pairs, dtype=torch.int32, device=device)  # + a slot for the left out
    sorted_pairs.scatter_(0, position, order.to(torch.int32))
    starts = torch.arange(blocks, device=device) * block_m
    expert = torch.searchsorted(ends[:num_local], starts, right=True)
    block_expert = torch.where(expert < num_local, expert, -1).to(torch.int32)
    return sorted_pairs[:size], block_expert


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, pairs_ptr, block_expert_ptr, x_scale_ptr, w_scale_ptr, num_pairs,
                    N, K, stride_xm, stride_we, stride_wn, stride_om, TOP_K: tl.constexpr, FP8: tl.constexpr,
                    SCALED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """out[pair, n] = silu(x[token] . gate[e, n]) * (x[token] . up[e, n]) for the pairs of one
    block (one expert) and BLOCK_N columns; gate rows are the expert's first N, up rows the next."""
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + rm)
    valid = pairs < num_pairs
    tokens = pairs // TOP_K
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tokens[:, None].to(tl.int64) * stride_xm
    w = w_ptr + expert.to(tl.int64) * stride_we
    gate_cols = w + rn[None, :].to(tl.int64) * stride_wn
    up_cols = w + (rn[None, :] + N).to(tl.int64) * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_rows + kk[None, :], mask=valid[:, None] & (kk[None, :] < K), other=0.0)
        w_mask = (kk[:, None] < K) & (rn[None, :] < N)
        g = tl.load(gate_cols + kk[:, None], mask=w_mask, other=0.0).to(a.dtype)  # int8: weight-only
        u = tl.load(up_cols + kk[:, None], mask=w_mask, other=0.0).to(a.dtype)
        gate += tl.dot(a, g, input_precision=PRECISION)
        up += tl.dot(a, u, input_precision=PRECISION)
    if FP8:
        x_scale = tl.load(x_scale_ptr + tokens, mask=valid, other=0.0)[:, None]
        gate *= x_scale
        up *= x_scale
    if SCALED:
        scales = w_scale_ptr + expert.to(tl.int64) * 2 * N
        gate *= tl.load(scales + rn, mask=rn < N, other=0.0)[None, :]
        up *= tl.load(scales + N + rn, mask=rn < N, other=0.0)[None, :]
    act = gate / (1.0 + tl.exp(-gate)) * up
    out = out_ptr + pairs[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, act.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (rn[None, :] < N))


@triton.jit
def _down_kernel(a_ptr, w_ptr, out_ptr, pairs_ptr, block_expert_ptr, routing_ptr, a_scale_ptr, w_scale_ptr,
                 num_pairs, N, K, stride_am, stride_we, stride_wn, stride_om, FP8: tl.constexpr, SCALED: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[pair, n] = routing weight[pair] * (a[pair] . down[e, n])."""
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + rm)
    valid = pairs < num_pairs
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + pairs[:, None].to(tl.int64) * stride_am
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + rn[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_rows + kk[None, :], mask=valid[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0).to(a.dtype)
        acc += tl.dot(a, w, input_precision=PRECISION)
    if FP8:
        acc *= tl.load(a_scale_ptr + pairs, mask=valid, other=0.0)[:, None]
    if SCALED:
        acc *= tl.load(w_scale_ptr + expert.to(tl.int64) * N + rn, mask=rn < N, other=0.0)[None, :]
    acc *= tl.load(routing_ptr + pairs, mask=valid, other=0.0)[:, None]
    out = out_ptr + pairs[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (rn[None, :] < N))


def launch_for(pairs: int, num_local: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small row blocks while an expert gets few pairs
    (decode), larger ones for prefill's many."""
    if pairs <= 16 * num_local:
        return 16, 64, 128, 4
    return 64, 128, 64, 8


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 rows, float32 scale per row): one kernel on a GPU, torch elsewhere (the interpreter
    cannot run fp8_rows' inline PTX)."""
    if rows.is_cuda:
        quantized = fp8_rows(rows)
        return quantized.values, quantized.scale.flatten()
    values, scale = quantize_rows_fp8(rows)
    return values, scale.flatten()


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, first_expert: int, gate_up_scale: torch.Tensor | None = None,
                  down_scale: torch.Tensor | None = None, launch: tuple[int, int, int, int] | None = None
                  ) -> torch.Tensor:
    """layers.moe.experts_reference's result, [tokens, hidden] in x's dtype, from the kernels
    above (with fp8 weights, each GEMM's input quantized per row first). `launch`: (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps), by default launch_for's."""
    if gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        raise ValueError(f"fused_experts reads each weight row contiguous; got strides {gate_up.stride()} (gate_up) "
                         f"and {down.stride()} (down)")
    if any(s is not None and not s.is_contiguous() for s in (gate_up_scale, down_scale)):
        raise ValueError("fused_experts reads the weight scales as contiguous [experts, rows]")
    tokens, hidden = x.shape
    top_k, num_local, inter = ids.shape[1], len(gate_up), down.shape[2]
    pairs = tokens * top_k
    block_m, block_n, block_k, warps = launch or launch_for(pairs, num_local)
    sorted_pairs, block_expert = sort_by_expert(ids, first_expert, num_local, block_m)
    fp8, scaled = gate_up.dtype == FP8, gate_up_scale is not None
    x = x.contiguous()
    x_in, x_scale = _quantize_rows(x) if fp8 else (x, None)
    # fp8 quantizes every row of act, those of pairs held elsewhere too (which no kernel writes)
    act = (torch.zeros if fp8 else torch.empty)(pairs, inter, dtype=x.dtype, device=x.device)
    # float32 operands (float32 x, and int8 weights widened to it) multiply exactly, not in tf32
    meta = dict(FP8=fp8, SCALED=scaled, PRECISION="ieee" if x_in.dtype == torch.float32 else "tf32",
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    grid = (len(block_expert), triton.cdiv(inter, block_n))
    _gate_up_kernel[grid](x_in, gate_up, act, sorted_pairs, block_expert, x_scale, gate_up_scale, pairs, inter,
                          hidden, x_in.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0), TOP_K=top_k,
                          **meta)
    act_in, act_scale = _quantize_rows(act) if fp8 else (act, None)
    out = torch.zeros(pairs, hidden, dtype=x.dtype, device=x.device)  # pairs held elsewhere stay 0
    grid = (len(block_expert), triton.cdiv(hidden, block_n))
    _down_kernel[grid](act_in, down, out, sorted_pairs, block_expert, weights.contiguous(), act_scale, down_scale,
                       pairs, hidden, inter, act_in.stride(0), down.stride(0), down.stride(1), out.stride(0), **meta)
    return out.view(tokens, top_k, hidden).sum(dim=1)
