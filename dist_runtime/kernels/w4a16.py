"""y = x W^T (+ b) with W in the int4 layout of dist_runtime/int4.py (W4A16), in Triton. The
reference, and the CPU path, is int4.int4_linear_reference: dequantize, then F.linear.

The weight is read as packed int32 words, 8 nibbles each, and becomes numbers in registers;
x stays in its dtype (fp16, bf16; float32 with exact products), the tensor cores multiply, and
every sum is float32. Why each part is as it is:
- **The weight is the dot's left operand** (each program computes a tile of y^T = W x^T): the
  tile dequantized in registers can feed the tensor cores from there (Hopper's wgmma takes
  only its left operand from registers), and for decode, where x has a row or a few, the
  weight's N is the tile's long side.
- **No int-to-float conversion per weight.** That instruction runs at a quarter of the rate
  of a multiply on an H100, and one per weight would cap decode near half the memory
  bandwidth. Instead a nibble is OR-ed into the mantissa of 2^23, whose last mantissa bit is
  worth 1, giving the float 2^23 + q; subtracting 2^23 + zero leaves q - zero, exact because
  zeros are integers. (The same trick in fp16 or bf16 would skip the conversion to x's
  dtype, but Triton's interpreter cannot run bfloat16 arithmetic, so no CPU test could check it.)
- **A thread unpacks whole words.** The 8 nibbles of a word are joined (tl.join) into 8
  adjacent columns held by the thread that loaded it: constant shifts, and no word read by 8
  threads each taking one nibble (which a broadcast [.., 8] shift would compile to).
- **Scales after the dot.** An inner step (SUB_K columns) lies inside one group, so q - zero,
  a whole number from -15 to 15 and exact in fp16 or bf16, goes into the dot as it is, and the
  group's float32 scale multiplies the [BLOCK_N, BLOCK_M] product once instead of every weight.
  Per weight that leaves a shift, a mask, an OR, a subtraction and half a two-wide conversion
  (ptxas for sm_90: about 6.5 instructions a weight, all counted). With g_idx (act-order) a
  step's columns belong to any groups: each weight is scaled before the dot, its scale and zero
  gathered per column; slower (int4.sort_act_order avoids it), the same code otherwise.
- **One warp per 16 weight rows.** The tensor cores' tile is 16 rows high; a tile with more
  warps than that has each compute the same rows (4x the work at BLOCK_N 16 with 4 warps).
  BLOCK_N 64 with 4 warps (128 with 8) lets Hopper use its warpgroup MMA.
- **Decode** (up to 16 rows, padded to 16: the smallest tensor-core tile) only streams the
  weight. What counts is bytes in flight on every SM: enough programs for every SM (split-K
  where N alone gives too few tiles) and several pipeline stages of loads outstanding. The
  splits store float32 partial sums, and the last split of each tile to arrive (an atomic
  count) adds them in split order and writes y, in the same launch: no second kernel, and
  the same bits whichever split finishes last.
- **Prefill** (many rows): larger tiles both ways; from DEQUANTIZE_ROWS rows on, the weight is
  dequantized into x's dtype once (one more kernel) and cuBLAS runs the GEMM, as the
  GEMM's own work then dwarfs the dequantization's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dist_runtime.int4 import NIBBLES, check_int4
from dist_runtime.kernels import pdl
from dist_runtime.kernels.pdl import wait_for_inputs

DECODE_ROWS = 16  # up to this many rows of x, one BLOCK_M of 16 holds them all
DEQUANTIZE_ROWS = 512  # from this many rows on: dequantize, then cuBLAS
PROGRAMS_PER_SM = 2  # while one program waits on its loads, the other's math runs
MAX_SPLIT_TILES = 1 << 16  # output tiles a split-K launch may have (its arrival counters)
DEQUANTIZE_BLOCK_N = 64
GATHER_BLOCK_K = 64  # K tile where each column's group is gathered (g_idx)
# (block_n, block_k, num_warps, num_stages) at decode, split_k from split_for: what a benchmark
# or the build may time. One warp per 16 weight rows.
DECODE_CONFIGS = [(64, 256, 4, 4), (64, 512, 4, 3), (64, 128, 4, 6), (32, 256, 2, 4), (32, 512, 2, 3),
                  (16, 256, 1, 4), (16, 512, 1, 3), (128, 256, 8, 3)]
LAUNCH_KEYS = {"block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages"}


@triton.jit
def _words(qw_ptr, rn, k0, N, K, stride_qn, SUB_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The int32 words [BLOCK_N, SUB_K // 8] of rows rn that hold columns k0 .. k0 + SUB_K."""
    kw = k0 // 8 + tl.arange(0, SUB_K // 8)
    at = qw_ptr + rn[:, None].to(tl.int64) * stride_qn + kw[None, :]
    if EVEN_K:
        mask = (rn < N)[:, None]
    else:
        mask = (rn < N)[:, None] & (kw < K // 8)[None, :]
    # read once and never again in this GEMM: let it leave the L2 first, before x and the scales
    return tl.load(at, mask=mask, other=0, eviction_policy="evict_first")


@triton.jit
def _minus_zero(words, zero, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr):
    """q - zero, float32 [BLOCK_N, SUB_K], from the words [BLOCK_N, SUB_K // 8]; zero is
    [BLOCK_N, 1] or a number. Nibble j of word i is column 8i + j. Each join puts its new last
    dimension in one thread, so a thread turns whole words into 8 adjacent columns (constant
    shifts, no word read by several threads); joined as [.., j // 4, j // 2 % 2, j % 2] they
    lie in column order. No int-to-float conversion: q in the low mantissa bits of 2^23, whose
    last bit is worth 1, is the float 2^23 + q, and 2^23 + zero is exact for an integer zero."""
    even = tl.join(tl.join(_nibble(words, 0), _nibble(words, 4)), tl.join(_nibble(words, 2), _nibble(words, 6)))
    odd = tl.join(tl.join(_nibble(words, 1), _nibble(words, 5)), tl.join(_nibble(words, 3), _nibble(words, 7)))
    q = tl.reshape(tl.join(even, odd), (BLOCK_N, SUB_K))
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (zero + 8388608.0)


@triton.jit
def _nibble(words, J: tl.constexpr):
    return (words >> (4 * J)) & 0xF  # the sign bit an arithmetic shift copies in is masked off


@triton.jit
def _scales_and_zeros(s_ptr, z_ptr, g_ptr, rn, k0, N, K, stride_sn, GROUP_SIZE: tl.constexpr,
                      HAS_G_IDX: tl.constexpr, SUB_K: tl.constexpr):
    """float32 scale and zero of rows rn for columns k0 .. k0 + SUB_K: [BLOCK_N, 1], the group
    these columns share, or with g_idx [BLOCK_N, SUB_K], each column's own. Past K (and past N)
    both are 0, so those weights are 0."""
    rows = rn[:, None].to(tl.int64) * stride_sn
    if HAS_G_IDX:
        kk = k0 + tl.arange(0, SUB_K)
        at = rows + tl.load(g_ptr + kk, mask=kk < K, other=0)[None, :]
        mask = (rn < N)[:, None] & (kk < K)[None, :]
    else:
        at = rows + k0 // GROUP_SIZE
        mask = (rn < N)[:, None] & (tl.full((1, 1), k0, tl.int32) < K)  # k0 may be past K (the last K tile)
    scale = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + at, mask=mask, other=0.0).to(tl.float32)
    return scale, zero


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, k_per_split,
                  stride_xm, stride_qn, stride_sn, stride_ym, stride_split, GROUP_SIZE: tl.constexpr,
                  HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr, EVEN_K: tl.constexpr,
                  PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Program (n, split, m): y^T[n tile, m tile] summed over the K range of `split`."""
    wait_for_inputs(PDL)
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_begin = split * k_per_split
    for k_tile in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        for j in tl.static_range(BLOCK_K // SUB_K):  # unrolled: the pipeliner sees every load of the tile
            k0 = k_tile + j * SUB_K
            kk = k0 + tl.arange(0, SUB_K)
            if EVEN_K:
                x = tl.load(x_rows + kk[None, :], mask=(rm < M)[:, None], other=0.0)
            else:
                x = tl.load(x_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
            words = _words(qw_ptr, rn, k0, N, K, stride_qn, SUB_K, EVEN_K)
            scale, zero = _scales_and_zeros(s_ptr, z_ptr, g_ptr, rn, k0, N, K, stride_sn, GROUP_SIZE, HAS_G_IDX,
                                            SUB_K)
            if HAS_G_IDX:
                w = (_minus_zero(words, 0.0, BLOCK_N, SUB_K) - zero) * scale
                acc = tl.dot(w.to(DTYPE), tl.trans(x), acc, input_precision=PRECISION)
            else:
                w = _minus_zero(words, zero, BLOCK_N, SUB_K)  # whole numbers -15..15: exact in x's dtype
                acc += tl.dot(w.to(DTYPE), tl.trans(x), input_precision=PRECISION) * scale
    mask = (rn < N)[:, None] & (rm < M)[None, :]
    if SPLIT:
        # Each split stores its float32 sums [splits, M, N]; the last of a tile's splits to
        # arrive adds them up in split order (the same bits whichever arrives last) and writes
        # y, in this launch: no second kernel. Its counter goes back to 0 for the next launch.
        parts = part_ptr + rm[None, :].to(tl.int64) * N + rn[:, None]
        tl.store(parts + split * stride_split, acc, mask=mask)
        tl.debug_barrier()  # every thread's store before the count: a release orders what the CTA wrote
        counter = count_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(counter, 1, sem="acq_rel") == tl.num_programs(1) - 1:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for other in range(tl.num_programs(1)):  # .cg: from the L2, never a stale L1 line
                acc += tl.load(parts + other * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0)
            _store_y(acc, b_ptr, y_ptr, rn, rm, N, stride_ym, mask, HAS_BIAS)
    else:
        _store_y(acc, b_ptr, y_ptr, rn, rm, N, stride_ym, mask, HAS_BIAS)


@triton.jit
def _store_y(acc, b_ptr, y_ptr, rn, rm, N, stride_ym, mask, HAS_BIAS: tl.constexpr):
    """y[rm, rn] = acc^T (+ bias), in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rm[None, :].to(tl.int64) * stride_ym + rn[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(qw_ptr, s_ptr, z_ptr, g_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn,
                       GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    """W [N, K] in w_ptr's dtype, one [BLOCK_N, BLOCK_K] tile a program, rounded once from
    float32 as the reference does."""
    wait_for_inputs(PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    words = _words(qw_ptr, rn, k0, N, K, stride_qn, BLOCK_K, EVEN_K)
    scale, zero = _scales_and_zeros(s_ptr, z_ptr, g_ptr, rn, k0, N, K, stride_sn, GROUP_SIZE, HAS_G_IDX, BLOCK_K)
    if HAS_G_IDX:
        w = (_minus_zero(words, 0.0, BLOCK_N, BLOCK_K) - zero) * scale
    else:
        w = _minus_zero(words, zero, BLOCK_N, BLOCK_K) * scale
    kk = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(rn < N)[:, None] & (kk < K)[None, :])


@functools.cache
def _sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """SMs of t's GPU; an H100's 132 for a CPU tensor (Triton's interpreter), so that launches
    pick the same tiles there."""
    if not t.is_cuda:
        return 132
    return _sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_for(m: int, n: int, k: int, sms: int) -> dict:
    """The default tiles, split_k, warps and stages of the Triton GEMM for x of m rows and a
    [n, k] weight on a GPU of `sms` SMs. One warp per 16 rows of the weight tile: the tensor
    cores' tile is 16 high, and more warps than that would each compute the same rows.
    BLOCK_N 64 with 4 warps (and 128 with 8) lets Hopper use its warpgroup MMA."""
    if m <= DECODE_ROWS:
        block_m, block_n, block_k, num_warps, num_stages = 16, 64, 256, 4, 4
    elif m <= 64:
        block_m, block_n, block_k, num_warps, num_stages = triton.next_power_of_2(m), 64, 128, 4, 3
    else:
        block_m, block_n, block_k, num_warps, num_stages = (64 if m <= 128 else 128), 128, 128, 8, 3
    split_k = split_for(triton.cdiv(n, block_n) * triton.cdiv(m, block_m), k, block_k, sms)
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                num_stages=num_stages)


def split_for(tiles: int, k: int, block_k: int, sms: int) -> int:
    """Splits of K (a power of two) that bring `tiles` output tiles near PROGRAMS_PER_SM
    programs per SM, each split keeping two K tiles or more."""
    split_k = 1
    while tiles * split_k * 2 <= PROGRAMS_PER_SM * sms and triton.cdiv(k, block_k) >= 4 * split_k:
        split_k *= 2
    return split_k


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor:
    """The split-K arrival counters of a device, all 0 between launches (each launch's last
    arrivals reset theirs). Shared by every launch on the device: launches on one stream
    (the runtime's way) never overlap in them. Made on the device's first split-K launch, which
    must not be inside a CUDA graph's capture: there the zeroing would only be recorded, and an
    eager launch before the first replay would count from whatever the memory held."""
    if device not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("w4a16_linear's first split-K launch on a device makes its counters; run one "
                               "before capturing a CUDA graph (as a warm-up does)")
        _COUNTERS[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 launch: dict | None = None) -> torch.Tensor:
    """int4_linear_reference's result from the Triton kernel, in x's dtype (leading dims of x
    kept); scales and zeros in any float dtype, x's or float32. `launch`: launch_for's keys (any
    left out are launch_for's for this shape, split_k split_for's for the tiles given), or
    {"dequantize": True}: dequantize the weight, then cuBLAS. Without it, x of DEQUANTIZE_ROWS
    rows or more takes the latter."""
    check_int4(qweight, scales, zeros, group_size, g_idx)
    n, k = qweight.shape[0], qweight.shape[1] * NIBBLES
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns; the int4 weight [{n}, {k}] takes {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32; got {x.dtype}")
    if qweight.stride(-1) != 1 or scales.stride(-1) != 1 or zeros.stride() != scales.stride():
        raise ValueError("qweight, scales and zeros must be contiguous in their rows, scales and zeros alike")
    launch = dict(launch or {})
    unknown = set(launch) - LAUNCH_KEYS - {"dequantize"}
    if unknown:
        raise ValueError(f"unknown launch keys {sorted(unknown)}; known: {sorted(LAUNCH_KEYS | {'dequantize'})}")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    dequantize = launch.pop("dequantize", not launch and m >= DEQUANTIZE_ROWS)
    given = {**launch_for(m, n, k, sm_count(x)), **launch}
    block_m, block_n, block_k = given["block_m"], given["block_n"], given["block_k"]
    sub_k = min(block_k, group_size)
    if g_idx is None and (block_k % sub_k or group_size % sub_k or sub_k % 16):
        # no inner step of 16+ columns (a tensor-core dot's least) lies inside one group and
        # divides the tile: gather each column's group, as for act-order
        g_idx = torch.arange(k, device=x.device, dtype=torch.int32) // group_size
    if g_idx is not None:
        # a scale and a zero gathered per weight take registers: past 64 columns a step spills
        block_k = sub_k = min(block_k, GATHER_BLOCK_K)
    common = dict(GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None, **pdl.launch(x))
    g_arg = g_idx if g_idx is not None else qweight  # an unused pointer must still be a tensor
    if dequantize:
        weight = torch.empty(n, k, dtype=x.dtype, device=x.device)
        _dequantize_kernel[(triton.cdiv(n, DEQUANTIZE_BLOCK_N), triton.cdiv(k, sub_k))](
            qweight, scales, zeros, g_arg, weight, n, k, qweight.stride(0), scales.stride(0), weight.stride(0),
            BLOCK_N=DEQUANTIZE_BLOCK_N, BLOCK_K=sub_k, EVEN_K=k % sub_k == 0, num_warps=4, **common)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = given["split_k"] if "split_k" in launch else split_for(tiles, k, block_k, sm_count(x))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)  # no empty splits
    if tiles > MAX_SPLIT_TILES:
        splits, k_per_split = 1, k
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partials = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    counters = _counters(x.device) if splits > 1 else qweight
    _w4a16_kernel[(triton.cdiv(n, block_n), splits, triton.cdiv(m, block_m))](
        rows, qweight, scales, zeros, g_arg, bias if bias is not None else qweight, out, partials, counters, m, n, k,
        k_per_split, rows.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), partials.stride(0),
        HAS_BIAS=bias is not None, SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SUB_K=sub_k, EVEN_K=k % block_k == 0, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=given["num_warps"], num_stages=given["num_stages"], **common)
    return out.view(*x.shape[:-1], n)
