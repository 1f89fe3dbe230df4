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


def merge_with_sink(tail_sunk: Tensor, tail_plain: Tensor, out_b: Tensor) -> Tensor:
    """The merge of a tail attention whose log-sum-exp is unknown with a side b whose log-sum-exp is known.

    A kernel with attention sinks but no log-sum-exp output (vLLM's CPU kernel) gives the tail twice: `tail_plain` =
    N/Z without a sink, `tail_sunk` = N/(Z + Z_b) with the sink logit set to side b's log-sum-exp. Their ratio is
    the tail's share Z/(Z + Z_b) of the merged softmax (the same for every dim; fitted by least squares over D, so
    the kernel's rounding of its outputs averages out), and the merge is tail_sunk + (1 - share) * out_b.
    tail_* [N,Hq,D] (any dtype), out_b [N,Hq,D]; returns fp32 [N,Hq,D]. A tail that is exactly zero (no visible
    keys with nonzero values) gives share 0.
    """
    sunk, plain = tail_sunk.float(), tail_plain.float()
    norm = (plain * plain).sum(-1)
    share = torch.where(norm > 0, (sunk * plain).sum(-1) / torch.where(norm > 0, norm, 1.0), 0.0).clamp(0.0, 1.0)
    return sunk + (1.0 - share)[..., None] * out_b.float()


def merge_with_sink_ref(tail_out: Tensor, tail_lse: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """merge_with_sink from exact log-sum-exps: the reference (merge_attention), fp32 [N,Hq,D]."""
    return merge_attention(tail_out.float(), tail_lse, out_b.float(), lse_b)[0]
