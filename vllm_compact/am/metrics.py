"""How well a compaction reproduces the span's attention for held-out queries (float64)."""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_compact.am.types import CompactedHeads, length_mask

# float64 elements of one logits chunk ([heads, N, T]); bounds memory to ~256 MiB.
_CHUNK_ELEMENTS = 1 << 25


def _attend(queries: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """float64 softmax output [h,N,D] and lse [h,N] of queries over keys with additive bias (-inf = absent)."""
    logits = torch.bmm(queries.double(), keys.double().transpose(1, 2)) * scale[:, None, None] + bias[:, None, :]
    lse = torch.logsumexp(logits, dim=2)
    stabiliser = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(logits - stabiliser[:, :, None])
    return torch.bmm(weights, values.double()), lse


def attention_errors(
    batch_keys: Tensor,
    batch_values: Tensor,
    key_len: Tensor | None,
    key_bias: Tensor | None,
    compacted: CompactedHeads,
    heldout_queries: Tensor,
    heldout_len: Tensor | None,
    scale: float | Tensor,
) -> dict[str, Tensor]:
    """Per-head {"output_rel_err", "mass_rel_err"} [H] float64 over the valid held-out queries (no causal mask).

    output_rel_err = ||O_compact - O_orig||_F / ||O_orig||_F; mass_rel_err = mean_i |M_compact_i / M_orig_i - 1|,
    taken as |expm1(lse_compact - lse_orig)|. A head without valid held-out queries gets NaN.
    """
    heads, n_keys, _ = batch_keys.shape
    n_queries = heldout_queries.shape[1]
    device = batch_keys.device
    key_valid = length_mask(key_len, heads, n_keys, device)
    bias = torch.zeros(heads, n_keys, dtype=torch.float64, device=device)
    if key_bias is not None:
        bias = key_bias.to(device=device, dtype=torch.float64)
    bias = torch.where(key_valid, bias, float("-inf"))
    entry_valid = length_mask(compacted.length, heads, compacted.max_length, device)
    compact_bias = torch.where(entry_valid, compacted.beta.double(), float("-inf"))
    query_valid = length_mask(heldout_len, heads, n_queries, device)
    scale_h = (
        scale.to(device=device, dtype=torch.float64).reshape(-1).expand(heads)
        if isinstance(scale, Tensor)
        else torch.full((heads,), float(scale), dtype=torch.float64, device=device)
    )

    output_err = torch.empty(heads, dtype=torch.float64, device=device)
    mass_err = torch.empty(heads, dtype=torch.float64, device=device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n_queries * max(n_keys, compacted.max_length)))
    for h0 in range(0, heads, step):
        hs = slice(h0, min(heads, h0 + step))
        out_orig, lse_orig = _attend(heldout_queries[hs], batch_keys[hs], batch_values[hs], bias[hs], scale_h[hs])
        out_comp, lse_comp = _attend(
            heldout_queries[hs], compacted.keys[hs], compacted.values[hs], compact_bias[hs], scale_h[hs]
        )
        rows = query_valid[hs]
        diff = (out_comp - out_orig).masked_fill(~rows[:, :, None], 0.0)
        reference = out_orig.masked_fill(~rows[:, :, None], 0.0)
        ratio = diff.flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1).clamp(min=1e-300)
        output_err[hs] = torch.where(rows.any(dim=1), ratio, float("nan"))
        mass_gap = torch.expm1(lse_comp - lse_orig).abs().masked_fill(~rows, 0.0)
        mass_err[hs] = mass_gap.sum(dim=1) / rows.sum(dim=1)  # NaN (0/0) without held-out queries
    return {"output_rel_err": output_err, "mass_rel_err": mass_err}

