"""Rotary position embeddings: full (Llama, rotate-half) or partial and interleaved (GPT-J),
with Llama 3.1 and linear frequency scaling, and Phi-3's longrope within its original context."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def inverse_frequencies(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    # Always on the CPU, even while a model is built on the meta device: these are values, not weights.
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "longrope":  # divided as transformers divides, for the same bits
        return 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32, device="cpu") * theta**exponents)
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: low frequencies slowed by `factor`, high ones kept, a smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, rotary_dim: int, theta: float, scaling: dict[str, Any] | None,
                 interleaved: bool) -> None:
        super().__init__()
        self.head_dim, self.rotary_dim, self.interleaved = head_dim, rotary_dim, interleaved
        self.register_buffer("inv_freq", inverse_frequencies(rotary_dim, theta, scaling), persistent=False)
        # longrope's cos and sin come scaled: the rotated dims of q and k grow by this much
        self.attention_factor = float((scaling or {}).get("attention_factor", 1.0))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor  # exact at 1

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]. On a GPU, rotated in
        place by one kernel each."""
        if q.is_cuda:
            from dist_runtime.kernels.fused import rotary_

            return rotary_(q, k, positions, self.inv_freq, self.interleaved, attention_factor=self.attention_factor)
        return self.reference(positions, q, k)

    def reference(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleaved:
            x1, x2 = rot[..., 0::2].float(), rot[..., 1::2].float()
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        else:
            x1, x2 = rot.float().chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return torch.cat([out.to(x.dtype), rest], dim=-1) if rest.numel() else out.to(x.dtype)

