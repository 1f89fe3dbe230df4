"""Exact merge of two partial attentions over disjoint key sets (the FlashAttention split-KV identity)."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b), lse = log(e^lse_a + e^lse_b).

    out_* [N,Hq,D], lse_* [N,Hq] (natural log). A side with lse = -inf contributes nothing (even if its out is
    NaN); both -inf -> out 0, lse -inf. Computed in fp32, returned in out_a's dtype.
    """
    lse_a = lse_a.float()
    lse_b = lse_b.float()
    top = torch.maximum(lse_a, lse_b)
    empty = top == float("-inf")
    top_safe = torch.where(empty, torch.zeros_like(top), top)
    weight_a = torch.exp(lse_a - top_safe)  # exp(-inf) = 0 for an empty side
    weight_b = torch.exp(lse_b - top_safe)
    total = weight_a + weight_b
    part_a = torch.where((weight_a > 0)[..., None], out_a.float() * weight_a[..., None], 0.0)
    part_b = torch.where((weight_b > 0)[..., None], out_b.float() * weight_b[..., None], 0.0)
    out = (part_a + part_b) / torch.where(empty, torch.ones_like(total), total)[..., None]
    lse = torch.where(empty, top, top_safe + torch.log(torch.where(empty, torch.ones_like(total), total)))
    return out.to(out_a.dtype), lse
