"""INT4 weight-only quantization (W4A16): the one layout every int4 engine holds, whether its
weights came from an AWQ or GPTQ checkpoint or were rounded here from a float one, and the
torch reference of its GEMM, which is the CPU path (kernels/w4a16.py is the GPU's).

For a weight [N outputs, K inputs] and groups of `group_size` input columns:
- `qweight`: int32 [N, K // 8], packed along K: nibble j (bits 4j..4j+3, low nibble first) of
  word i of row n holds q[n, 8i + j], unsigned 0..15. A row's words lie in the order a GEMM
  walks K, so a tile of them is one contiguous read per row.
- `scales`, `zeros`: [N, groups] in the activation dtype (or float32); `zeros` in integer units
  (whole numbers 0..15; symmetric GPTQ: 8), which the GPU kernel relies on to subtract exactly.
- `g_idx`: optional int32 [K], the group of each input column (GPTQ's act-order); None means
  column k is in group k // group_size. With it, `scales` and `zeros` may hold more groups than
  K columns make (a row-parallel slice keeps every group of the layer).

weight[n, k] = (q[n, k] - zeros[n, g(k)]) * scales[n, g(k)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NIBBLES = 8  # per int32 word
INT4_MAX = 15
WHOLE_INPUT = -1  # a group size of one group over a layer's whole input, as Hugging Face configs write it


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers 0..15 [N, K] (K a multiple of 8) -> int32 words [N, K // 8]."""
    if q.dim() != 2 or q.shape[1] % NIBBLES:
        raise ValueError(f"pack_int4 takes [N, K] with K a multiple of {NIBBLES}; got {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack_int4 takes integers 0..15; got {q.dtype}")
    if q.numel() and (q.min() < 0 or q.max() > INT4_MAX):
        raise ValueError(f"pack_int4 takes integers 0..15; got values in {q.min().item()}..{q.max().item()}")
    values = q.to(torch.int32).reshape(q.shape[0], -1, NIBBLES)
    words = torch.zeros(values.shape[:2], dtype=torch.int32, device=q.device)
    for j in range(NIBBLES):
        words |= values[:, :, j] << (4 * j)  # nibble 7 lands in the sign bit: the int32 wraps, as stored
    return words


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words [..., n] -> int32 [..., n, 8]: nibble j (bits 4j..4j+3) of each word, 0..15."""
    shifts = torch.arange(0, 4 * NIBBLES, 4, dtype=torch.int32, device=words.device)
    # an arithmetic shift copies the sign bit in from the left; the mask drops it
    return (words[..., None] >> shifts) & INT4_MAX


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 words [N, K // 8] -> uint8 [N, K], each 0..15."""
    _check_qweight(qweight)
    return nibbles(qweight).to(torch.uint8).view(qweight.shape[0], -1)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The group of each input column (int64 [K]): g_idx as it is, or k // group_size."""
    if g_idx is not None:
        if g_idx.shape != (in_features,):
            raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}; the weight has {in_features} input columns")
        return g_idx.long()
    return torch.arange(in_features, device=device) // group_size


def columns_per_group(columns: int, group_size: int) -> int:
    """`group_size`, or all `columns` where one group spans a layer's whole input."""
    return columns if group_size == WHOLE_INPUT else group_size


def group_count(columns: int, group_size: int) -> int:
    """Groups (the last may be partial) of `group_size` columns over `columns` input columns."""
    return -(-columns // columns_per_group(columns, group_size))


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] in `dtype`: (q - zero) * scale computed in float32, rounded once."""
    check_int4(qweight, scales, zeros, group_size, g_idx)
    q = unpack_int4(qweight)
    n, k = q.shape
    if g_idx is None and k % group_size == 0:  # whole groups: broadcast each group's scale, no gather
        q = q.view(n, -1, group_size).float()
        w = (q - zeros.float()[:, :, None]) * scales.float()[:, :, None]
        return w.view(n, k).to(dtype)
    g = group_index(k, group_size, g_idx, qweight.device)
    return ((q.float() - zeros.float()[:, g]) * scales.float()[:, g]).to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest, per output row and group of `group_size` input columns: (qweight,
    float32 scales, float32 zeros). Asymmetric: the group's range, widened to hold 0, is 15
    steps, and 0 falls on a whole step (the zero point); symmetric (GPTQ's): a step is
    2 * max |w| / 15 and the zero point 8. Every element is then within half a step of its
    weight; an all-zero group gets scale 1."""
    n, k = weight.shape
    if group_size <= 0 or k % group_size or group_size % NIBBLES:
        raise ValueError(f"quantize_int4: group_size {group_size} must divide the {k} input columns "
                         f"and be a multiple of {NIBBLES}")
    groups = weight.float().view(n, k // group_size, group_size)
    if symmetric:
        scales = _nonzero(groups.abs().amax(dim=2) * (2 / INT4_MAX))
        zeros = torch.full_like(scales, (INT4_MAX + 1) // 2)
    else:
        low = groups.amin(dim=2).clamp(max=0)
        scales = _nonzero((groups.amax(dim=2).clamp(min=0) - low) / INT4_MAX)
        zeros = torch.round(-low / scales).clamp(0, INT4_MAX)
    q = torch.round(groups / scales[:, :, None]) + zeros[:, :, None]
    return pack_int4(q.clamp(0, INT4_MAX).to(torch.int32).view(n, k)), scales, zeros


def sort_act_order(qweight: torch.Tensor, g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight with its input columns in group order, perm: int32 [K]) for an act-order
    weight (GPTQ's desc_act), whose groups are still group_size columns each but scattered
    over K: after the sort column k is in group k // group_size, the g_idx-free GEMM applies,
    and int4_linear(x[..., perm], sorted, scales, zeros, group_size) equals
    int4_linear(x, qweight, scales, zeros, group_size, g_idx). The permutation spans the whole
    K: a row-parallel weight split over K needs each rank's columns to stay its own."""
    k = qweight.shape[1] * NIBBLES
    perm = torch.argsort(group_index(k, group_size, g_idx), stable=True)
    if not torch.equal(g_idx.long()[perm], group_index(k, group_size, device=g_idx.device)):
        raise ValueError(f"g_idx does not put {group_size} columns in each group; it cannot be sorted into the "
                         f"plain layout")
    return pack_int4(unpack_int4(qweight)[:, perm]), perm.to(torch.int32)


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int, g_idx: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the dequantized weight, in x's dtype (float32 for float32 x): the CPU path
    and what the Triton kernel is held to."""
    weight = dequantize_int4(qweight, scales, zeros, group_size, g_idx, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def check_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               g_idx: torch.Tensor | None = None) -> None:
    """Refuse tensors that do not make one weight of the layout, naming the one at fault."""
    _check_qweight(qweight)
    n, k = qweight.shape[0], qweight.shape[1] * NIBBLES
    if group_size <= 0:
        raise ValueError(f"group_size must be positive; got {group_size}")
    if g_idx is not None and (g_idx.shape != (k,) or g_idx.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"g_idx must be int32 [{k}] (one group per input column); got "
                         f"{g_idx.dtype} {tuple(g_idx.shape)}")
    groups = group_count(k, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        # with g_idx any count: a row-parallel slice of an act-order weight keeps all the layer's groups
        if t.dim() != 2 or t.shape[0] != n or (t.shape[1] != groups if g_idx is None else t.shape[1] < 1):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; a [{n}, {k}] weight in groups of {group_size} "
                             f"needs [{n}, {groups if g_idx is None else 'groups'}]")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be float16, bfloat16 or float32; got {t.dtype}")
    if zeros.dtype != scales.dtype:
        raise ValueError(f"zeros are {zeros.dtype} but scales are {scales.dtype}; the layout keeps them alike")


def _nonzero(scales: torch.Tensor) -> torch.Tensor:
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def _check_qweight(qweight: torch.Tensor) -> None:
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be int32 [N, K // 8]; got {qweight.dtype} {tuple(qweight.shape)}")
