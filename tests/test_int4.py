"""INT4 weight-only (W4A16): the layout's packing, dequantization and round-to-nearest
quantization element by element; the torch reference GEMM; and the Triton kernel
(kernels/w4a16.py) against the reference, through Triton's interpreter on a CPU and compiled on
a GPU (at real shapes, every decode launch, graph replays). Run as a script, this file does the
interpreted checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dist_runtime.int4 import (
    dequantize_int4,
    int4_linear_reference,
    pack_int4,
    quantize_int4,
    sort_act_order,
    unpack_int4,
)

# relative error (Frobenius) of the kernel against the float64 reference: x's dtype rounds the output
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


def act_order(k: int, group_size: int, seed: int = 0) -> torch.Tensor:
    """A GPTQ act-order g_idx: group_size columns in each group, scattered over K."""
    return (torch.randperm(k, generator=torch.Generator().manual_seed(seed)) // group_size).to(torch.int32)


def random_int4(n: int, k: int, group_size: int, dtype: torch.dtype = torch.float32, symmetric: bool = False,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, scales, zeros) of a random weight, rounded by quantize_int4; scales and zeros in dtype."""
    w = torch.randn(n, k, device=device) * 0.05
    qweight, scales, zeros = quantize_int4(w, group_size, symmetric)
    return qweight, scales.to(dtype), zeros.to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_pack_puts_column_8i_plus_j_in_nibble_j_of_word_i():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 9]])
    words = pack_int4(q)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert words[0, 0].item() == 0x87654321 - (1 << 32)  # nibble 7 (8) sets the sign bit: stored as it wraps
    assert words[0, 1].item() == 0x9000000F - (1 << 32)
    assert torch.equal(unpack_int4(words), q.to(torch.uint8))


def test_unpack_inverts_pack():
    q = torch.randint(0, 16, (37, 96))
    assert torch.equal(unpack_int4(pack_int4(q)).long(), q)
    assert torch.equal(pack_int4(unpack_int4(pack_int4(q))), pack_int4(q))


@pytest.mark.parametrize("q,match", [(torch.full((2, 8), 16), "0..15"), (torch.full((2, 8), -1), "0..15"),
                                     (torch.zeros(2, 12, dtype=torch.int32), "multiple of 8"),
                                     (torch.zeros(2, 8), "integers")])
def test_pack_refuses_what_is_not_nibbles(q, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(q)


@pytest.mark.parametrize("with_g_idx", [False, True])
def test_dequantize_is_q_minus_zero_times_scale_per_element(with_g_idx):
    torch.manual_seed(0)
    n, k, group_size = 3, 48, 16
    q = torch.randint(0, 16, (n, k))
    scales = torch.rand(n, k // group_size) + 0.1
    zeros = torch.randint(0, 16, (n, k // group_size)).float()
    g_idx = act_order(k, group_size) if with_g_idx else None
    w = dequantize_int4(pack_int4(q), scales, zeros, group_size, g_idx)
    for r in range(n):
        for c in range(k):
            g = g_idx[c].item() if with_g_idx else c // group_size
            assert w[r, c].item() == pytest.approx((q[r, c].item() - zeros[r, g].item()) * scales[r, g].item(),
                                                   rel=1e-6)
    assert dequantize_int4(pack_int4(q), scales.bfloat16(), zeros.bfloat16(), group_size, g_idx,
                           torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_keeps_every_weight_within_half_a_step(symmetric, group_size):
    torch.manual_seed(0)
    w = torch.randn(19, 256) * torch.logspace(-3, 1, 19)[:, None]  # rows of very different ranges
    w[4] = 0  # all-zero groups
    w[6, 3] = 50.0  # an outlier widens its group alone
    w[7] = w[7].abs() + 0.1  # all positive: an asymmetric range still holds 0
    qweight, scales, zeros = quantize_int4(w, group_size, symmetric)
    assert qweight.shape == (19, 256 // 8) and scales.shape == zeros.shape == (19, 256 // group_size)
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15
    if symmetric:
        assert (zeros == 8).all()
    step = scales.repeat_interleave(group_size, dim=1)
    err = (dequantize_int4(qweight, scales, zeros, group_size) - w).abs()
    assert (err <= step / 2 * (1 + 1e-5)).all()
    assert (dequantize_int4(qweight, scales, zeros, group_size)[4] == 0).all()
    assert err[6, 3] <= 50.0 * 1e-6 + step[6, 3] / 2  # the outlier itself sits on the grid's edge
    if not symmetric:  # (symmetric rounding can land a group's -max on -8 steps: a wider range next time)
        requantized = quantize_int4(dequantize_int4(qweight, scales, zeros, group_size), group_size)
        assert torch.equal(requantized[0], qweight)  # a weight on the grid rounds to itself


def test_quantize_refuses_a_group_size_that_does_not_divide_the_inputs():
    with pytest.raises(ValueError, match="group_size 100"):
        quantize_int4(torch.randn(4, 256), 100)


def test_reference_is_linear_with_the_dequantized_weight():
    torch.manual_seed(0)
    qweight, scales, zeros = random_int4(24, 256, 128)
    x = torch.randn(2, 3, 256)
    bias = torch.randn(24)
    w = dequantize_int4(qweight, scales, zeros, 128)
    out = int4_linear_reference(x, qweight, scales, zeros, 128, bias=bias)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 24)
    assert torch.allclose(out, x @ w.T + bias, rtol=1e-5, atol=1e-5)
    exact = int4_linear_reference(x.double(), qweight, scales, zeros, 128, bias=bias)
    assert rel_err(out, exact) < 1e-6
    out16 = int4_linear_reference(x.bfloat16(), qweight, scales.bfloat16(), zeros.bfloat16(), 128, bias=bias)
    assert out16.dtype == torch.bfloat16 and rel_err(out16, exact) < 1e-2


def test_sorting_act_order_groups_gives_the_same_linear():
    torch.manual_seed(0)
    k, group_size = 512, 128
    qweight, scales, zeros = random_int4(40, k, group_size)
    g_idx = act_order(k, group_size)
    x = torch.randn(5, k)
    ref = int4_linear_reference(x, qweight, scales, zeros, group_size, g_idx)
    sorted_qweight, perm = sort_act_order(qweight, g_idx, group_size)
    assert perm.dtype == torch.int32
    assert torch.allclose(int4_linear_reference(x[:, perm.long()], sorted_qweight, scales, zeros, group_size), ref,
                          rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="128 columns in each group"):
        sort_act_order(qweight, torch.zeros(k, dtype=torch.int32), group_size)


def act_order_slice(m: int, dtype: torch.dtype, device: str = "cpu") -> tuple:
    """A row-parallel rank's half of an act-order weight: its columns, their g_idx, and every
    group's scales and zeros; with its half of x and the full weight's product on that half."""
    torch.manual_seed(0)
    k, group_size = 512, 128
    qweight, scales, zeros = random_int4(48, k, group_size, dtype, device=device)
    g_idx = act_order(k, group_size).to(device)
    x = torch.randn(m, k, device=device).to(dtype)
    x_half = torch.cat([x[:, : k // 2], torch.zeros_like(x[:, k // 2:])], dim=1)
    full = int4_linear_reference(x_half.double(), qweight, scales, zeros, group_size, g_idx)
    return x[:, : k // 2], qweight[:, : k // 16].contiguous(), scales, zeros, group_size, g_idx[: k // 2], full


def test_a_row_parallel_slice_of_an_act_order_weight_keeps_every_group():
    x, qweight, scales, zeros, group_size, g_idx, full = act_order_slice(3, torch.float32)
    assert scales.shape[1] == 4 and qweight.shape[1] * 8 == 256  # four groups' scales, two groups' worth of columns
    assert rel_err(int4_linear_reference(x, qweight, scales, zeros, group_size, g_idx), full) < 1e-6


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(2, 128)), "x has 128 columns"),
    (dict(scales=torch.ones(48, 3)), r"scales has shape \(48, 3\)"),
    (dict(zeros=torch.ones(48, 2, dtype=torch.float16)), "zeros are torch.float16"),
    (dict(qweight=torch.zeros(48, 32, dtype=torch.int64)), "qweight must be int32"),
    (dict(g_idx=torch.zeros(255, dtype=torch.int32)), "g_idx must be int32 .256."),
    (dict(launch={"block_q": 16}), "unknown launch keys"),
])
def test_kernel_refuses_inputs_that_do_not_make_one_weight(change, match):
    from dist_runtime.kernels.w4a16 import w4a16_linear

    qweight, scales, zeros = random_int4(48, 256, 128)
    args = dict(x=torch.randn(2, 256), qweight=qweight, scales=scales, zeros=zeros, group_size=128) | change
    with pytest.raises(ValueError, match=match):
        w4a16_linear(**args)


@pytest.mark.parametrize("n,k", [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (1024, 4096)])
def test_decode_launches_fill_an_h100s_sms(n, k):
    """Llama-3-8B's GEMMs at one row (and a lone K/V projection): about a program per SM of
    132 or more, split-K where the output alone has too few tiles, and no tile with more warps
    than its 16-row slices."""
    import triton

    from dist_runtime.kernels.w4a16 import launch_for

    launch = launch_for(1, n, k, 132)
    programs = triton.cdiv(n, launch["block_n"]) * launch["split_k"]
    assert programs >= 128, launch
    assert 16 * launch["num_warps"] <= launch["block_n"]
    assert triton.cdiv(k, launch["block_k"]) >= 2 * launch["split_k"]  # two K tiles a split or more


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, the compiled kernel's tests below run")
def test_kernel_matches_the_reference_in_tritons_interpreter():
    """One row, 3 and 70; N=48 (a partial tile) and K=384 (a partial K tile); groups of 128, 64,
    96 (gathered: no step lies inside one) and one per row; act-order g_idx, and a row-parallel
    slice of it; a bias; split-K (its counters left at 0); the dequantize-then-linear path;
    float32, float16, bfloat16."""
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 3 * len(INTERPRETED_CASES) + 3
    for case, (dtype, err) in results.items():
        assert err <= TOLERANCE[dtype], (case, err)


# (rows, N, K, group_size, act-order, bias, launch)
INTERPRETED_CASES = [
    (1, 48, 256, 128, False, True, None),
    (3, 48, 384, 128, False, False, None),
    (70, 48, 256, 128, False, True, None),
    (17, 48, 256, 128, False, False, None),
    (1, 48, 256, 128, True, False, None),
    (70, 48, 384, 128, True, True, None),
    (3, 48, 512, 128, False, True, {"split_k": 4, "block_k": 64, "block_n": 16, "num_warps": 1}),
    (1, 48, 384, 128, True, False, {"split_k": 3, "block_k": 128}),
    (5, 40, 256, 64, False, False, {"block_k": 256}),
    (2, 48, 256, 256, False, False, None),
    (3, 48, 384, 96, False, True, None),
    (5, 48, 256, 128, False, True, {"dequantize": True}),
    (5, 48, 384, 128, True, False, {"dequantize": True}),
]


def _widen_bfloat16_in_interpreted_dots() -> None:
    """Triton's interpreter keeps bfloat16 as its raw uint16 bits, and its tl.dot multiplies
    those bits as integers; widen them to float32 first, as the tensor cores do exactly."""
    import numpy as np
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype.scalar != interpreter.tl.bfloat16:
            return t
        return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), interpreter.tl.float32)

    interpreter.InterpreterBuilder.create_dot = lambda self, a, b, *rest: dot(self, widen(a), widen(b), *rest)


def _interpreted_checks() -> dict[str, tuple[str, float]]:
    from dist_runtime.kernels.w4a16 import _counters, w4a16_linear

    _widen_bfloat16_in_interpreted_dots()
    results = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for i, (m, n, k, group_size, with_g_idx, with_bias, launch) in enumerate(INTERPRETED_CASES):
            torch.manual_seed(i)
            qweight, scales, zeros = random_int4(n, k, group_size, dtype, symmetric=i % 2 == 1)
            g_idx = act_order(k, group_size, seed=i) if with_g_idx else None
            bias = torch.randn(n).to(dtype) if with_bias else None
            x = torch.randn(m, k).to(dtype)
            if m == 2:
                x = x.view(1, 2, k)  # leading dims kept
            out = w4a16_linear(x, qweight, scales, zeros, group_size, g_idx, bias, launch)
            ref = int4_linear_reference(x.double(), qweight, scales, zeros, group_size, g_idx, bias)
            err = rel_err(out, ref) if out.dtype == dtype and out.shape == ref.shape else float("inf")
            results[f"{dtype} m={m} n={n} k={k} group={group_size} act_order={with_g_idx} bias={with_bias} "
                     f"{launch}"] = (str(dtype).removeprefix("torch."), err)
    for dtype in (torch.float32, torch.bfloat16):
        x, qweight, scales, zeros, group_size, g_idx, full = act_order_slice(3, dtype)
        out = w4a16_linear(x, qweight, scales, zeros, group_size, g_idx)
        results[f"{dtype} row-parallel act-order slice"] = (str(dtype).removeprefix("torch."), rel_err(out, full))
    results["split-K counters back at 0"] = ("float32", float(_counters(torch.device("cpu")).abs().sum()))
    return results


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 256, 1024])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_kernel_matches_the_reference_at_real_shapes(dtype, m, n, k):
    """Llama-3-8B's shapes: decode (split-K), a full decode tile, the fused prefill tiles and,
    at 1,024 rows, dequantize-then-cuBLAS."""
    from dist_runtime.kernels.w4a16 import w4a16_linear

    torch.manual_seed(0)
    qweight, scales, zeros = random_int4(n, k, 128, dtype, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    ref = int4_linear_reference(x.float(), qweight, scales, zeros, 128, bias=bias)
    assert rel_err(w4a16_linear(x, qweight, scales, zeros, 128, bias=bias), ref) < TOLERANCE[str(dtype)[6:]]


@GPU
@pytest.mark.parametrize("m", [1, 7, 100])
def test_act_order_kernel_matches_the_reference(m):
    from dist_runtime.kernels.w4a16 import w4a16_linear

    torch.manual_seed(0)
    n, k = 4096, 4096
    qweight, scales, zeros = random_int4(n, k, 128, torch.bfloat16, device="cuda")
    g_idx = act_order(k, 128).cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = int4_linear_reference(x.float(), qweight, scales, zeros, 128, g_idx)
    assert rel_err(w4a16_linear(x, qweight, scales, zeros, 128, g_idx), ref) < TOLERANCE["bfloat16"]
    sorted_qweight, perm = sort_act_order(qweight, g_idx, 128)
    assert rel_err(w4a16_linear(x[:, perm.long()], sorted_qweight, scales, zeros, 128), ref) < TOLERANCE["bfloat16"]
    x, qweight, scales, zeros, group_size, g_idx, full = act_order_slice(m, torch.bfloat16, "cuda")
    assert rel_err(w4a16_linear(x, qweight, scales, zeros, group_size, g_idx), full) < TOLERANCE["bfloat16"]


@GPU
@pytest.mark.parametrize("m", [1, 5, 16])
def test_every_decode_launch_matches_the_reference_and_repeats_bit_for_bit(m):
    """Each candidate a benchmark or the build may pick, with its split-K; split-K sums in a
    fixed order, so two launches give the same bits, and its counters are left at 0."""
    from triton.runtime.errors import OutOfResources

    from dist_runtime.kernels.w4a16 import DECODE_CONFIGS, _counters, w4a16_linear

    torch.manual_seed(0)
    n, k = 4096, 4096
    qweight, scales, zeros = random_int4(n, k, 128, torch.bfloat16, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = int4_linear_reference(x.float(), qweight, scales, zeros, 128, bias=bias)
    for block_n, block_k, num_warps, num_stages in DECODE_CONFIGS:
        launch = dict(block_m=16, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
        try:
            out = w4a16_linear(x, qweight, scales, zeros, 128, bias=bias, launch=launch)
        except OutOfResources:
            continue  # more shared memory than this GPU has: the sweep skips it too
        assert rel_err(out, ref) < TOLERANCE["bfloat16"], launch
        assert torch.equal(w4a16_linear(x, qweight, scales, zeros, 128, bias=bias, launch=launch), out), launch
    assert _counters(x.device).abs().sum().item() == 0


@GPU
def test_split_k_replays_in_a_cuda_graph():
    from dist_runtime.kernels.w4a16 import w4a16_linear

    torch.manual_seed(0)
    qweight, scales, zeros = random_int4(4096, 4096, 128, torch.bfloat16, device="cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = w4a16_linear(x, qweight, scales, zeros, 128)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_linear(x, qweight, scales, zeros, 128)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@GPU
def test_split_k_counters_are_refused_their_making_inside_a_capture():
    """Made inside a capture, the counters' zeroing would only be recorded, and an eager launch
    before the first replay would count from stale memory."""
    from dist_runtime.kernels import w4a16

    qweight, scales, zeros = random_int4(4096, 4096, 128, torch.bfloat16, device="cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w4a16.w4a16_linear(x, qweight, scales, zeros, 128)  # compiled, and its counters made, outside
    saved = w4a16._COUNTERS.pop(x.device)
    try:
        with pytest.raises(RuntimeError, match="before capturing"), torch.cuda.graph(torch.cuda.CUDAGraph()):
            w4a16.w4a16_linear(x, qweight, scales, zeros, 128)
    finally:
        w4a16._COUNTERS[x.device] = saved


@GPU
def test_benchmark_reports_weight_bandwidth():
    """benchmarks/w4a16.py's figures for one small shape: a JSON row per shape with GB/s."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from w4a16 import measure

    row = measure(1, 4096, 4096, torch.bfloat16, sweep=False)
    assert row["int4_gbps"] > 0 and row["bf16_gbps"] > 0


if __name__ == "__main__":
    print(json.dumps(_interpreted_checks()))
