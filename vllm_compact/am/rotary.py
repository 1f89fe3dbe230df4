"""The keys a cache stores are rotated by their position (RoPE); undoing the rotation leaves what they say.

Two keys of the same content at different positions differ by a rotation, so position-free scores (how unlike
the rest a key is, selection.distinct_scores) must read unrotated keys. The engine glue builds a Rotary from the
model's own cos/sin table; offline code may build one from the config's theta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rotary:
    """RoPE as the model applied it to the first `2 * cos.shape[1]` dims of each key (the rest pass through)."""

    cos: Tensor  # [P, R/2] fp32, cos of each position's angles
    sin: Tensor  # [P, R/2] fp32
    neox: bool = True  # the rotated pairs are (x[i], x[i + R/2]); else interleaved (x[2i], x[2i + 1])

    @classmethod
    def from_theta(cls, theta: float, rotary_dim: int, max_positions: int, neox: bool = True) -> Rotary:
        """Plain RoPE: angle of pair i at position p is p * theta^(-2i / rotary_dim)."""
        inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
        return cls(angles.cos().float(), angles.sin().float(), neox)

    @classmethod
    def from_cos_sin_cache(cls, cache: Tensor, neox: bool) -> Rotary:
        """From a [P, R] table whose first half is cos and second half sin (vLLM's RotaryEmbedding layout)."""
        cos, sin = cache.float().chunk(2, dim=-1)
        return cls(cos.contiguous(), sin.contiguous(), neox)

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def unrotate(self, keys: Tensor, positions: Tensor) -> Tensor:
        """fp32 keys [..., T, D] as they were before the rotation at `positions` [..., T] (int64)."""
        half = self.cos.shape[1]
        x = keys.float()
        rows = positions.reshape(-1, positions.shape[-1])
        if rows.shape[0] > 1 and bool((rows == rows[:1]).all()):
            positions = rows[0]  # every head of a batch at the same positions: one table lookup, broadcast
        cos = self.cos.to(x.device)[positions]
        sin = self.sin.to(x.device)[positions]
        if self.neox:
            x1, x2 = x[..., :half], x[..., half : 2 * half]
        else:
            x1, x2 = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        # The rotation maps (x1, x2) to (x1 cos - x2 sin, x2 cos + x1 sin); its inverse turns the other way.
        y1, y2 = x1 * cos + x2 * sin, x2 * cos - x1 * sin
        out = x.clone()
        if self.neox:
            out[..., :half], out[..., half : 2 * half] = y1, y2
        else:
            out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = y1, y2
        return out
